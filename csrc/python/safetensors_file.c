// safetensors_file.c: every safetensors file Python reads goes through the
// core's hardened parser (safetensors.c): checkpoints, and the embedding,
// regression and gating files training writes.
//
// SafetensorsFile(path) maps and validates a file once; `read` copies rows of
// a tensor out of the mapping (optionally converted to float32/float64) and
// then drops the pages it read, so streaming a file larger than RAM keeps the
// process small; `view` returns a zero-copy read-only array over the mapping
// (which stays mapped while any view lives). inspect_safetensors /
// parse_safetensors_bytes list a file's tensors (the fuzz driver and the
// tests use them).
#define _DEFAULT_SOURCE  // madvise
#include "binding.h"

#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "../dtype.h"

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

// ---- SafetensorsFile ------------------------------------------------------

typedef struct {
    PyObject_HEAD
    StFile f;
    int opened;
    PyObject *path;      // str
    PyObject *metadata;  // dict str -> str
    int *order;          // tensor indices in data-offset (file) order
} PySTFile;

static PyTypeObject TensorInfoType;

static PyStructSequence_Field tensor_info_fields[] = {
    {"name", "tensor name"}, {"dtype", "safetensors dtype name: F32, BF16, ..."},
    {"shape", "tuple of ints"}, {"data_offsets", "(begin, end) byte offsets in the data section"}, {NULL, NULL}};
static PyStructSequence_Desc tensor_info_desc = {"armorm._core.TensorInfo", "one tensor of a safetensors header",
                                                 tensor_info_fields, 4};

// NumPy type of a stored dtype (BF16: its uint16 bit patterns), or -1 when NumPy has none.
static int npy_type_of(StDType d) {
    switch (d) {
        case ST_F32: return NPY_FLOAT32;
        case ST_BF16: return NPY_UINT16;
        case ST_F16: return NPY_FLOAT16;
        case ST_F64: return NPY_FLOAT64;
        case ST_I64: return NPY_INT64;
        case ST_I32: return NPY_INT32;
        case ST_I16: return NPY_INT16;
        case ST_I8: return NPY_INT8;
        case ST_U8: return NPY_UINT8;
        case ST_BOOL: return NPY_BOOL;
        case ST_U16: return NPY_UINT16;
        case ST_U32: return NPY_UINT32;
        case ST_U64: return NPY_UINT64;
        default: return -1;
    }
}

// Element i of stored data as type T. A tensor may start at any byte of the
// file (safetensors does not align), so elements are read with memcpy, which
// the compiler turns into a plain (unaligned-safe) load.
#define DEFINE_LOAD(name, T)                                                  \
    static inline T name(const void *p, uint64_t i) {                         \
        T v;                                                                  \
        memcpy(&v, (const unsigned char *)p + i * sizeof(T), sizeof(T));      \
        return v;                                                             \
    }
DEFINE_LOAD(ld_f32, float)
DEFINE_LOAD(ld_f64, double)
DEFINE_LOAD(ld_i64, int64_t)
DEFINE_LOAD(ld_i32, int32_t)
DEFINE_LOAD(ld_i16, int16_t)
DEFINE_LOAD(ld_i8, int8_t)
DEFINE_LOAD(ld_u64, uint64_t)
DEFINE_LOAD(ld_u32, uint32_t)
DEFINE_LOAD(ld_u16, uint16_t)
DEFINE_LOAD(ld_u8, uint8_t)

// Element i of stored data as a double (numeric dtypes; the caller checked npy_type_of).
static double load_as_f64(const void *p, StDType d, uint64_t i) {
    switch (d) {
        case ST_F32: return ld_f32(p, i);
        case ST_BF16: return bf16_to_f32(ld_u16(p, i));
        case ST_F16: return f16_to_f32(ld_u16(p, i));
        case ST_F64: return ld_f64(p, i);
        case ST_I64: return (double)ld_i64(p, i);
        case ST_I32: return ld_i32(p, i);
        case ST_I16: return ld_i16(p, i);
        case ST_I8: return ld_i8(p, i);
        case ST_U8: case ST_BOOL: return ld_u8(p, i);
        case ST_U16: return ld_u16(p, i);
        case ST_U32: return ld_u32(p, i);
        default: return (double)ld_u64(p, i);
    }
}

// n stored elements -> float32 or float64 (to_f64) at dst. bf16 and f16 to float32 are exact bit work.
static void convert_to(void *dst, int to_f64, const void *src, StDType d, uint64_t n) {
    if (!to_f64) {
        float *o = dst;
        if (d == ST_BF16) for (uint64_t i = 0; i < n; i++) o[i] = bf16_to_f32(ld_u16(src, i));
        else if (d == ST_F16) for (uint64_t i = 0; i < n; i++) o[i] = f16_to_f32(ld_u16(src, i));
        else if (d == ST_F32) memcpy(o, src, n * sizeof(float));
        else for (uint64_t i = 0; i < n; i++) o[i] = (float)load_as_f64(src, d, i);
    } else {
        double *o = dst;
        if (d == ST_F64) memcpy(o, src, n * sizeof(double));
        else for (uint64_t i = 0; i < n; i++) o[i] = load_as_f64(src, d, i);
    }
}

// NumPy type of tensor t as stored; -1 with a ValueError when NumPy has none (F8, unknown dtypes).
static int stored_npy_type(PySTFile *self, const StTensor *t) {
    const int type = npy_type_of(t->dtype);
    if (type < 0)
        PyErr_Format(PyExc_ValueError, "%U: tensor '%s' has dtype %s, which NumPy cannot hold", self->path, t->name,
                     t->dtype_name);
    return type;
}

static int st_check_open(PySTFile *self) {
    if (!self->opened) {
        PyErr_SetString(PyExc_ValueError, "SafetensorsFile is not open");
        return -1;
    }
    return 0;
}

static const StTensor *st_get(PySTFile *self, PyObject *name_o) {
    if (st_check_open(self)) return NULL;
    const char *name = PyUnicode_Check(name_o) ? PyUnicode_AsUTF8(name_o) : NULL;
    if (!name) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "a tensor name must be a str");
        return NULL;
    }
    const StTensor *t = st_find(&self->f, name);
    if (!t) {
        PyObject *have = PyUnicode_FromString(self->f.n_tensors ? "" : "none");
        for (int i = 0; have && i < self->f.n_tensors && i < 20; i++) {
            PyObject *nx = PyUnicode_FromFormat("%U%s%s", have, i ? ", " : "", self->f.tensors[self->order[i]].name);
            Py_DECREF(have);
            have = nx;
        }
        if (!have) return NULL;
        PyErr_Format(PyExc_ValueError, "%U: no tensor named %R (it has %U%s)", self->path, name_o, have,
                     self->f.n_tensors > 20 ? ", ..." : "");
        Py_DECREF(have);
    }
    return t;
}

typedef struct {
    uint64_t begin;
    const char *name;
    int index;
} OrderKey;

static int cmp_order(const void *a, const void *b) {
    const OrderKey *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return strcmp(x->name, y->name);
}

static void PySTFile_dealloc(PySTFile *self) {
    if (self->opened) st_close(&self->f);
    PyMem_Free(self->order);
    Py_XDECREF(self->path);
    Py_XDECREF(self->metadata);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int PySTFile_init(PySTFile *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", NULL};
    PyObject *path_o;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O", kwlist, &path_o)) return -1;
    if (self->opened) {
        PyErr_SetString(PyExc_RuntimeError, "SafetensorsFile already initialised");
        return -1;
    }
    PyObject *enc, *str;
    if (!PyUnicode_FSConverter(path_o, &enc)) return -1;
    if (!PyUnicode_FSDecoder(path_o, &str)) {
        Py_DECREF(enc);
        return -1;
    }
    char err[ARM_ERRLEN] = {0};
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = st_open(&self->f, PyBytes_AS_STRING(enc), err, sizeof err);
    Py_END_ALLOW_THREADS
    Py_DECREF(enc);
    if (r) {
        Py_DECREF(str);
        PyErr_Format(PyExc_ValueError, "%s", err);
        return -1;
    }
    self->opened = 1;
    self->path = str;
    self->metadata = PyDict_New();
    self->order = PyMem_Malloc(sizeof(int) * (size_t)(self->f.n_tensors ? self->f.n_tensors : 1));
    if (!self->metadata || !self->order) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < self->f.n_meta; i++) {
        const StMeta *m = &self->f.meta[i];
        PyObject *k = PyUnicode_DecodeUTF8(m->key, (Py_ssize_t)m->key_len, "strict");
        PyObject *v = k ? PyUnicode_DecodeUTF8(m->value, (Py_ssize_t)m->value_len, "strict") : NULL;
        int bad = !v || PyDict_SetItem(self->metadata, k, v);
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (bad) return -1;
    }
    const int n = self->f.n_tensors;
    OrderKey *keys = PyMem_Malloc(sizeof *keys * (size_t)(n ? n : 1));
    if (!keys) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < n; i++) keys[i] = (OrderKey){self->f.tensors[i].begin, self->f.tensors[i].name, i};
    qsort(keys, (size_t)n, sizeof *keys, cmp_order);
    for (int i = 0; i < n; i++) self->order[i] = keys[i].index;
    PyMem_Free(keys);
    return 0;
}

static PyObject *PySTFile_keys(PySTFile *self, PyObject *unused) {
    (void)unused;
    if (st_check_open(self)) return NULL;
    PyObject *lst = PyList_New(self->f.n_tensors);
    for (int i = 0; lst && i < self->f.n_tensors; i++) {
        PyObject *n = PyUnicode_FromString(self->f.tensors[self->order[i]].name);
        if (!n) { Py_CLEAR(lst); break; }
        PyList_SET_ITEM(lst, i, n);
    }
    return lst;
}

static int PySTFile_contains(PySTFile *self, PyObject *name_o) {
    if (st_check_open(self)) return -1;
    const char *name = PyUnicode_Check(name_o) ? PyUnicode_AsUTF8(name_o) : NULL;
    if (!name) {
        PyErr_Clear();
        return 0;
    }
    return st_find(&self->f, name) != NULL;
}

static PyObject *shape_tuple(const StTensor *t, int64_t first) {
    PyObject *shape = PyTuple_New(t->ndim);
    for (int d = 0; shape && d < t->ndim; d++) {
        PyObject *v = PyLong_FromLongLong(d == 0 && first >= 0 ? first : t->shape[d]);
        if (!v) { Py_CLEAR(shape); break; }
        PyTuple_SET_ITEM(shape, d, v);
    }
    return shape;
}

static PyObject *PySTFile_info(PySTFile *self, PyObject *name_o) {
    const StTensor *t = st_get(self, name_o);
    if (!t) return NULL;
    PyObject *info = PyStructSequence_New(&TensorInfoType);
    if (!info) return NULL;
    PyObject *vals[4] = {PyUnicode_FromString(t->name), PyUnicode_FromString(t->dtype_name), shape_tuple(t, -1),
                         Py_BuildValue("(KK)", (unsigned long long)t->begin, (unsigned long long)t->end)};
    for (int i = 0; i < 4; i++) {
        if (!vals[i]) {
            for (int j = 0; j < 4; j++) Py_XDECREF(vals[j]);
            Py_DECREF(info);  // the slots set so far are NULL: safe
            return NULL;
        }
    }
    for (int i = 0; i < 4; i++) PyStructSequence_SET_ITEM(info, i, vals[i]);
    return info;
}

// Drops the whole pages of [p, p + n) from the mapping: they were read once and are not needed
// (a view of them, if any, faults them in again from the page cache).
static void release_pages(const void *p, size_t n) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t a = ((uintptr_t)p + page - 1) / page * page, b = ((uintptr_t)p + n) / page * page;
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

static PyObject *PySTFile_read(PySTFile *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"name", "start", "stop", "out", "dtype", NULL};
    PyObject *name_o, *stop_o = Py_None, *out_o = Py_None, *dtype_o = Py_None;
    long long start = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|LO$OO", kwlist, &name_o, &start, &stop_o, &out_o, &dtype_o))
        return NULL;
    const StTensor *t = st_get(self, name_o);
    if (!t) return NULL;
    const int stored = stored_npy_type(self, t);
    if (stored < 0) return NULL;
    int want = stored;
    if (dtype_o != Py_None) {
        PyArray_Descr *d = NULL;
        if (!PyArray_DescrConverter(dtype_o, &d)) return NULL;
        want = d->type_num;
        Py_DECREF(d);
        if (want != NPY_FLOAT32 && want != NPY_FLOAT64)
            return PyErr_Format(PyExc_ValueError, "read: dtype must be None, float32 or float64");
        if (t->dtype == ST_BOOL)
            return PyErr_Format(PyExc_ValueError, "%U: tensor '%s' is BOOL; it has no floating-point value",
                                self->path, t->name);
    }
    const int64_t rows = t->ndim ? t->shape[0] : 1;
    long long stop = rows;
    if (stop_o != Py_None) {
        stop = PyLong_AsLongLong(stop_o);
        if (stop == -1 && PyErr_Occurred()) return NULL;
    }
    if (!(0 <= start && start <= stop && stop <= rows) || (t->ndim == 0 && (start != 0 || stop != 1)))
        return PyErr_Format(PyExc_IndexError, "rows [%lld, %lld) out of range for '%s' with %lld rows", start, stop,
                            t->name, (long long)rows);
    const uint64_t per_row = t->ndim ? (rows ? t->numel / (uint64_t)rows : 0) : 1;
    const uint64_t n = per_row * (uint64_t)(stop - start);
    const size_t isz = st_dtype_size(t->dtype);
    npy_intp dims[ST_MAX_DIMS];
    for (int d = 0; d < t->ndim; d++) dims[d] = (npy_intp)(d == 0 ? stop - start : t->shape[d]);
    PyArrayObject *out;
    if (out_o == Py_None) {
        out = (PyArrayObject *)PyArray_SimpleNew(t->ndim, dims, want);
        if (!out) return NULL;
    } else {
        out = (PyArrayObject *)out_o;
        int ok = PyArray_Check(out_o) && PyArray_TYPE(out) == want && PyArray_NDIM(out) == t->ndim &&
                 PyArray_IS_C_CONTIGUOUS(out) && PyArray_ISALIGNED(out) && PyArray_ISWRITEABLE(out) &&
                 !PyArray_ISBYTESWAPPED(out);
        for (int d = 0; ok && d < t->ndim; d++) ok = PyArray_DIM(out, d) == dims[d];
        if (!ok) return PyErr_Format(PyExc_ValueError, "read: `out` has the wrong shape, dtype or layout");
        Py_INCREF(out);
    }
    const unsigned char *src = (const unsigned char *)t->data + (uint64_t)start * per_row * isz;
    void *dst = PyArray_DATA(out);
    const int same = want == stored;
    const int to_f64 = want == NPY_FLOAT64;
    const int mapped = self->f.map != NULL;
    Py_BEGIN_ALLOW_THREADS
    if (same) memcpy(dst, src, n * isz);
    else convert_to(dst, to_f64, src, t->dtype, n);
    if (mapped) release_pages(src, n * isz);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

static PyObject *PySTFile_view(PySTFile *self, PyObject *name_o) {
    const StTensor *t = st_get(self, name_o);
    if (!t) return NULL;
    const int stored = stored_npy_type(self, t);
    if (stored < 0) return NULL;
    npy_intp dims[ST_MAX_DIMS];
    for (int d = 0; d < t->ndim; d++) dims[d] = (npy_intp)t->shape[d];
    PyArray_Descr *descr = PyArray_DescrFromType(stored);
    if (!descr) return NULL;
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, descr, t->ndim, dims, NULL, (void *)t->data,
                                         NPY_ARRAY_C_CONTIGUOUS, NULL);
    if (!arr) return NULL;
    PyArray_UpdateFlags((PyArrayObject *)arr, NPY_ARRAY_ALIGNED);
    PyArray_CLEARFLAGS((PyArrayObject *)arr, NPY_ARRAY_WRITEABLE);  // the mapping is read-only
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)self) < 0) {  // keeps the mapping alive
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static PyObject *PySTFile_get_path(PySTFile *self, void *unused) {
    (void)unused;
    if (st_check_open(self)) return NULL;
    Py_INCREF(self->path);
    return self->path;
}

static PyObject *PySTFile_get_metadata(PySTFile *self, void *unused) {
    (void)unused;
    if (st_check_open(self)) return NULL;
    return PyDict_Copy(self->metadata);
}

static PyObject *PySTFile_repr(PySTFile *self) {
    if (!self->opened) return PyUnicode_FromString("SafetensorsFile(<not open>)");
    return PyUnicode_FromFormat("SafetensorsFile(%R, %d tensors)", self->path, self->f.n_tensors);
}

static PyMethodDef PySTFile_methods[] = {
    {"keys", (PyCFunction)PySTFile_keys, METH_NOARGS, "keys() -> tensor names, in file order"},
    {"info", (PyCFunction)PySTFile_info, METH_O, "info(name) -> TensorInfo(name, dtype, shape, data_offsets)"},
    {"read", (PyCFunction)(void (*)(void))PySTFile_read, METH_VARARGS | METH_KEYWORDS,
     "read(name, start=0, stop=None, *, out=None, dtype=None) -> a copy of rows [start, stop) of the first axis\n"
     "(the whole tensor by default), as stored (BF16 as its uint16 bits) or converted to dtype float32 or float64;\n"
     "into `out` when given. The pages read are dropped from the mapping afterwards."},
    {"view", (PyCFunction)PySTFile_view, METH_O,
     "view(name) -> read-only array over the mapped bytes, no copy (BF16 as uint16 bits)"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef PySTFile_getset[] = {
    {"path", (getter)PySTFile_get_path, NULL, "the file's path", NULL},
    {"metadata", (getter)PySTFile_get_metadata, NULL, "__metadata__ as a dict of str (a copy)", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PySequenceMethods PySTFile_as_sequence = {.sq_contains = (objobjproc)PySTFile_contains};

static PyTypeObject PySTFileType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "armorm._core.SafetensorsFile",
    .tp_basicsize = sizeof(PySTFile),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SafetensorsFile(path): a mapped safetensors file, validated by the core's parser (ValueError "
              "naming the file and the defect)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)PySTFile_init,
    .tp_dealloc = (destructor)PySTFile_dealloc,
    .tp_repr = (reprfunc)PySTFile_repr,
    .tp_methods = PySTFile_methods,
    .tp_getset = PySTFile_getset,
    .tp_as_sequence = &PySTFile_as_sequence,
};

static PyMethodDef safetensors_methods[] = {
    {"inspect_safetensors", py_inspect_safetensors, METH_O,
     "inspect_safetensors(path) -> list of {name, dtype, shape, data_offsets}; ValueError on a bad file"},
    {"parse_safetensors_bytes", py_parse_safetensors_bytes, METH_O,
     "parse_safetensors_bytes(buf) -> like inspect_safetensors, for an in-memory file (fuzzing)"},
    {NULL, NULL, 0, NULL}};

int add_safetensors_api(PyObject *mod) {
    if (PyStructSequence_InitType2(&TensorInfoType, &tensor_info_desc) < 0 || PyType_Ready(&PySTFileType) < 0)
        return -1;
    Py_INCREF(&PySTFileType);
    if (PyModule_AddObject(mod, "SafetensorsFile", (PyObject *)&PySTFileType) < 0) {
        Py_DECREF(&PySTFileType);
        return -1;
    }
    Py_INCREF(&TensorInfoType);
    if (PyModule_AddObject(mod, "TensorInfo", (PyObject *)&TensorInfoType) < 0) {
        Py_DECREF(&TensorInfoType);
        return -1;
    }
    return PyModule_AddFunctions(mod, safetensors_methods);
}
