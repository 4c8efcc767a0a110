// safetensors_file.c: the safetensors parser (safetensors.c) from Python.
//
// inspect_safetensors / parse_safetensors_bytes list a file's tensors (the
// fuzz driver and the tests use them).
#include "binding.h"

#include <string.h>

static PyObject *st_to_list(const StFile *f) {
    PyObject *lst = PyList_New(f->n_tensors);
    if (!lst) return NULL;
    for (int i = 0; i < f->n_tensors; i++) {
        const StTensor *t = &f->tensors[i];
        PyObject *shape = PyTuple_New(t->ndim);
        if (!shape) { Py_DECREF(lst); return NULL; }
        for (int d = 0; d < t->ndim; d++) PyTuple_SET_ITEM(shape, d, PyLong_FromLongLong(t->shape[d]));
        PyObject *item = Py_BuildValue("{s:s,s:s,s:N,s:(KK)}", "name", t->name, "dtype", t->dtype_name, "shape",
                                       shape, "data_offsets", (unsigned long long)t->begin,
                                       (unsigned long long)t->end);
        if (!item) { Py_DECREF(lst); return NULL; }
        PyList_SET_ITEM(lst, i, item);
    }
    return lst;
}

static PyObject *py_inspect_safetensors(PyObject *m, PyObject *arg) {
    (void)m;
    PyObject *enc;
    if (!PyUnicode_FSConverter(arg, &enc)) return NULL;
    StFile f;
    memset(&f, 0, sizeof f);
    f.fd = -1;
    char err[ARM_ERRLEN] = {0};
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = st_open(&f, PyBytes_AS_STRING(enc), err, sizeof err);
    Py_END_ALLOW_THREADS
    Py_DECREF(enc);
    if (r) return PyErr_Format(PyExc_ValueError, "%s", err);
    PyObject *lst = st_to_list(&f);
    st_close(&f);
    return lst;
}

static PyObject *py_parse_safetensors_bytes(PyObject *m, PyObject *arg) {
    (void)m;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE)) return NULL;
    StFile f;
    memset(&f, 0, sizeof f);
    f.fd = -1;
    char err[ARM_ERRLEN] = {0};
    int r = st_parse_buffer(&f, view.buf, (size_t)view.len, "<bytes>", err, sizeof err);
    PyObject *res = r ? PyErr_Format(PyExc_ValueError, "%s", err) : st_to_list(&f);
    st_close(&f);
    PyBuffer_Release(&view);
    return res;
}

static PyMethodDef safetensors_methods[] = {
    {"inspect_safetensors", py_inspect_safetensors, METH_O,
     "inspect_safetensors(path) -> list of {name, dtype, shape, data_offsets}; ValueError on a bad file"},
    {"parse_safetensors_bytes", py_parse_safetensors_bytes, METH_O,
     "parse_safetensors_bytes(buf) -> like inspect_safetensors, for an in-memory file (fuzzing)"},
    {NULL, NULL, 0, NULL}};

int add_safetensors_api(PyObject *mod) { return PyModule_AddFunctions(mod, safetensors_methods); }
