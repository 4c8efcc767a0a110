// numeric.c: the array operations training runs on the core, from Python.
//
// gemm: C [+]= op(A) @ op(B) with bf16 operands and fp32 sums (cpu/gemm_general.c),
// for stage 1's X^T X and stage 2's gating network; adamw_update: one fused
// AdamW step (cpu/adamw.c). Arrays are checked (dtype, layout, no aliasing of
// the output) before the GIL is released.
#include "binding.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#include <string.h>
#include "../cpu/adamw.h"
#include "../cpu/gemm_general.h"

// a 2-D C-contiguous float32 or uint16 (bf16 bits) array as a GemmOperand
static int to_operand(PyObject *o, const char *name, int trans, GemmOperand *op) {
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "gemm: %s must be a NumPy array, got %s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)o;
    const int t = PyArray_TYPE(arr);
    if (PyArray_NDIM(arr) != 2) {
        PyErr_Format(PyExc_ValueError, "gemm: %s must be 2-D, got %d dimensions", name, PyArray_NDIM(arr));
        return -1;
    }
    if (t != NPY_FLOAT32 && t != NPY_UINT16) {
        PyErr_Format(PyExc_TypeError, "gemm: %s must be float32 or uint16 (bf16 bits)", name);
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(arr) || !PyArray_ISALIGNED(arr) || PyArray_ISBYTESWAPPED(arr)) {
        PyErr_Format(PyExc_ValueError, "gemm: %s must be C-contiguous, aligned and native byte order", name);
        return -1;
    }
    op->data = PyArray_DATA(arr);
    op->dtype = t == NPY_FLOAT32 ? WT_F32 : WT_BF16;
    op->rows = PyArray_DIM(arr, 0);
    op->cols = PyArray_DIM(arr, 1);
    op->trans = trans;
    return 0;
}

static int overlaps(PyArrayObject *x, PyObject *y) {
    if (!PyArray_Check(y)) return 0;
    const char *a0 = PyArray_BYTES(x), *a1 = a0 + PyArray_NBYTES(x);
    const char *b0 = PyArray_BYTES((PyArrayObject *)y), *b1 = b0 + PyArray_NBYTES((PyArrayObject *)y);
    return a0 < b1 && b0 < a1;
}

static PyObject *py_gemm(PyObject *m, PyObject *args, PyObject *kw) {
    (void)m;
    static char *kwlist[] = {"a", "b", "trans_a", "trans_b", "out", "accumulate", "num_threads", "kernel", NULL};
    PyObject *a, *b, *out = Py_None;
    int ta = 0, tb = 0, acc = 0, nthreads = 0;
    const char *kernel = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$ppOpiz", kwlist, &a, &b, &ta, &tb, &out, &acc, &nthreads,
                                     &kernel))
        return NULL;
    GemmOperand oa, ob;
    if (to_operand(a, "a", ta, &oa) || to_operand(b, "b", tb, &ob)) return NULL;
    const int64_t M = ta ? oa.cols : oa.rows, K = ta ? oa.rows : oa.cols;
    const int64_t K2 = tb ? ob.cols : ob.rows, N = tb ? ob.rows : ob.cols;
    if (K != K2)
        return PyErr_Format(PyExc_ValueError, "gemm: op(a) is (%lld, %lld) but op(b) is (%lld, %lld): inner sizes differ",
                            (long long)M, (long long)K, (long long)K2, (long long)N);
    if (nthreads < 0 || nthreads > 1024)
        return PyErr_Format(PyExc_ValueError, "gemm: num_threads must be in 0..1024 (0: every core), got %d",
                            nthreads);
#ifdef _OPENMP
    if (nthreads == 0) nthreads = omp_get_num_procs();
#else
    if (nthreads == 0) nthreads = 1;
#endif
    GemmGeneralPath path = gemm_general_best();
    if (kernel && strcmp(kernel, "portable") == 0) path = GEMM_GENERAL_PORTABLE;
    else if (kernel && strcmp(kernel, "auto") != 0 && strcmp(kernel, gemm_general_name(path)) != 0)
        return PyErr_Format(PyExc_ValueError, "gemm: kernel must be 'auto', 'portable' or (on this CPU) '%s', got '%s'",
                            gemm_general_name(path), kernel);
    PyArrayObject *res;
    if (out == Py_None) {
        if (acc) return PyErr_Format(PyExc_ValueError, "gemm: accumulate=True needs out=");
        npy_intp dims[2] = {(npy_intp)M, (npy_intp)N};
        res = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (!res) return NULL;
    } else {
        if (!PyArray_Check(out) || PyArray_TYPE((PyArrayObject *)out) != NPY_FLOAT32 ||
            PyArray_NDIM((PyArrayObject *)out) != 2 || PyArray_DIM((PyArrayObject *)out, 0) != M ||
            PyArray_DIM((PyArrayObject *)out, 1) != N)
            return PyErr_Format(PyExc_ValueError, "gemm: out must be a float32 array of shape (%lld, %lld)",
                                (long long)M, (long long)N);
        res = (PyArrayObject *)out;
        if (!PyArray_IS_C_CONTIGUOUS(res) || !PyArray_ISALIGNED(res) || !PyArray_ISWRITEABLE(res) ||
            PyArray_ISBYTESWAPPED(res))
            return PyErr_Format(PyExc_ValueError, "gemm: out must be C-contiguous, aligned, native and writeable");
        if (overlaps(res, a) || overlaps(res, b))
            return PyErr_Format(PyExc_ValueError, "gemm: out must not share memory with a or b");
        Py_INCREF(res);
    }
    int r;
    float *c = (float *)PyArray_DATA(res);
    Py_BEGIN_ALLOW_THREADS
    r = gemm_general(c, &oa, &ob, acc, nthreads, path);
    Py_END_ALLOW_THREADS
    if (r) {
        Py_DECREF(res);
        return PyErr_NoMemory();
    }
    return (PyObject *)res;
}

// a writeable (or, for g, readable) C-contiguous float32 array of n elements
static float *f32_data(PyObject *o, const char *name, int writeable, npy_intp *n) {
    if (!PyArray_Check(o) || PyArray_TYPE((PyArrayObject *)o) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "adamw_update: %s must be a float32 NumPy array", name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) || PyArray_ISBYTESWAPPED(a) ||
        (writeable && !PyArray_ISWRITEABLE(a))) {
        PyErr_Format(PyExc_ValueError, "adamw_update: %s must be C-contiguous, aligned, native%s", name,
                     writeable ? " and writeable" : "");
        return NULL;
    }
    if (*n >= 0 && PyArray_SIZE(a) != *n) {
        PyErr_Format(PyExc_ValueError, "adamw_update: %s has %lld elements, the parameter %lld", name,
                     (long long)PyArray_SIZE(a), (long long)*n);
        return NULL;
    }
    *n = PyArray_SIZE(a);
    return (float *)PyArray_DATA(a);
}

static PyObject *py_adamw_update(PyObject *mod, PyObject *args, PyObject *kw) {
    (void)mod;
    static char *kwlist[] = {"param", "grad", "m", "v", "lr", "beta1", "beta2", "eps", "weight_decay", "step",
                             "num_threads", NULL};
    PyObject *po, *go, *mo, *vo;
    AdamWParams hp = {1e-3f, 0.9f, 0.999f, 1e-8f, 1e-2f, 0};  // torch.optim.AdamW's defaults
    long long step = 0;
    int nthreads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|$fffffLi", kwlist, &po, &go, &mo, &vo, &hp.lr, &hp.beta1,
                                     &hp.beta2, &hp.eps, &hp.weight_decay, &step, &nthreads))
        return NULL;
    if (step < 1) return PyErr_Format(PyExc_ValueError, "adamw_update: step must be >= 1, got %lld", step);
    if (nthreads < 1 || nthreads > 1024)
        return PyErr_Format(PyExc_ValueError, "adamw_update: num_threads must be in 1..1024, got %d", nthreads);
    hp.step = step;
    npy_intp n = -1;
    float *p = f32_data(po, "param", 1, &n), *g = p ? f32_data(go, "grad", 0, &n) : NULL;
    float *m = g ? f32_data(mo, "m", 1, &n) : NULL, *v = m ? f32_data(vo, "v", 1, &n) : NULL;
    if (!v) return NULL;
    PyArrayObject *arrs[4] = {(PyArrayObject *)po, (PyArrayObject *)go, (PyArrayObject *)mo, (PyArrayObject *)vo};
    for (int i = 0; i < 4; i++)
        for (int j = i + 1; j < 4; j++)
            if (overlaps(arrs[i], (PyObject *)arrs[j]))
                return PyErr_Format(PyExc_ValueError, "adamw_update: param, grad, m and v must not share memory");
    Py_BEGIN_ALLOW_THREADS
    adamw_update(p, m, v, g, (int64_t)n, &hp, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_gemm_kernel(PyObject *m, PyObject *unused) {
    (void)m;
    (void)unused;
    return PyUnicode_FromString(gemm_general_name(gemm_general_best()));
}

static PyMethodDef numeric_methods[] = {
    {"gemm", (PyCFunction)(void (*)(void))py_gemm, METH_VARARGS | METH_KEYWORDS,
     "gemm(a, b, *, trans_a=False, trans_b=False, out=None, accumulate=False, num_threads=0, kernel=None)\n"
     "-> float32 (M, N) = [out +] op(a) @ op(b); operands float32 or uint16 bf16 bits, rounded to bf16,\n"
     "products summed in fp32 (vdpbf16ps where the CPU has AVX512_BF16, else plain C); num_threads=0: every core"},
    {"adamw_update", (PyCFunction)(void (*)(void))py_adamw_update, METH_VARARGS | METH_KEYWORDS,
     "adamw_update(param, grad, m, v, *, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step,\n"
     "num_threads=1): one torch.optim.AdamW update of float32 arrays, in place; step counts from 1"},
    {"gemm_kernel", py_gemm_kernel, METH_NOARGS, "gemm_kernel() -> 'avx512bf16' or 'portable': gemm's path here"},
    {NULL, NULL, 0, NULL}};

int add_numeric_functions(PyObject *mod) { return PyModule_AddFunctions(mod, numeric_methods); }
