// module.c: the CPython face of the core (armorm._core).
//
// Model(paths, config, dtype, num_threads) maps and validates a checkpoint;
// Model.forward(...) runs one packed batch with the GIL released and returns
// a dict of NumPy arrays. Every C error becomes a Python exception carrying
// the core's message: ValueError for bad checkpoints and inputs, MemoryError
// for allocation failures, KeyboardInterrupt when Ctrl-C arrives mid-batch.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#include <string.h>
#include "model.h"
#include "cpu/adamw.h"
#include "cpu/gemm_general.h"
#ifdef ARMORM_WITH_CUDA
#include "cuda/backend_cuda.h"
#else
typedef struct CudaModel CudaModel;
#endif
// Why the CUDA backend is (not) in this build, as setup.py's build step found it
// (build_tools/cuda_build.py); a build that bypassed it has no reason to give.
#ifndef ARMORM_CUDA_BUILD_REASON
#define ARMORM_CUDA_BUILD_REASON "built without setup.py's CUDA step"
#endif

typedef struct {
    PyObject_HEAD
    Model model;
    int loaded;
    int busy;  // forward calls in flight: close() must not unmap under them
    CudaModel *cuda;  // the device copy when loaded with device >= 0
    int device;       // -1: CPU
} PyModel;

static void free_cuda(PyModel *self) {
#ifdef ARMORM_WITH_CUDA
    cuda_model_free(self->cuda);
#endif
    self->cuda = NULL;
}

static PyObject *raise_arm(const ArmError *e) {
    if (strncmp(e->msg, "out of memory", 13) == 0) return PyErr_Format(PyExc_MemoryError, "%s", e->msg);
    return PyErr_Format(PyExc_ValueError, "%s", e->msg);
}

// ---- config dict -> Config ------------------------------------------------

static int get_num(PyObject *d, const char *key, double *out, int required) {
    PyObject *v = PyDict_GetItemString(d, key);  // borrowed
    if (!v || v == Py_None) {
        if (required) {
            PyErr_Format(PyExc_KeyError, "config is missing '%s'", key);
            return -1;
        }
        return 1;
    }
    if (PyBool_Check(v)) {
        *out = v == Py_True;
        return 0;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "config '%s' must be a number", key);
        return -1;
    }
    *out = x;
    return 0;
}

static int get_int(PyObject *d, const char *key, int *out, int required, int dflt) {
    double x;
    int r = get_num(d, key, &x, required);
    if (r < 0) return -1;
    if (r == 1) { *out = dflt; return 0; }
    // range first: converting NaN or an out-of-range double to an integer is undefined
    if (!(x >= -2147483648.0 && x <= 2147483647.0) || x != (double)(long long)x) {
        char buf[64];
        snprintf(buf, sizeof buf, "%g", x);  // PyErr_Format has no %g
        PyErr_Format(PyExc_ValueError, "config '%s' must be an integer in the int32 range, got %s", key, buf);
        return -1;
    }
    *out = (int)x;
    return 0;
}

// "sliding_layers": the indices of the layers that use the sliding window.
static int config_layers_from_dict(PyObject *d, Config *c) {
    PyObject *v = PyDict_GetItemString(d, "sliding_layers");  // borrowed
    if (!v || v == Py_None) return 0;
    PyObject *seq = PySequence_Fast(v, "config 'sliding_layers' must be a sequence of layer indices");
    if (!seq) return -1;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        long l = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (l == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        if (l < 0 || l >= c->num_layers || l >= ARM_MAX_LAYERS) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "config 'sliding_layers': layer %ld is outside the %d layers", l,
                         c->num_layers);
            return -1;
        }
        c->sliding_layers[l / 64] |= (uint64_t)1 << (l % 64);
    }
    Py_DECREF(seq);
    return 0;
}

// "model_class": the checkpoint's class name, for messages.
static int config_class_from_dict(PyObject *d, Config *c) {
    PyObject *v = PyDict_GetItemString(d, "model_class");  // borrowed
    if (!v || v == Py_None) return 0;
    const char *name = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
    if (!name) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "config 'model_class' must be a str");
        return -1;
    }
    snprintf(c->model_class, sizeof c->model_class, "%s", name);
    return 0;
}

static int config_from_dict(PyObject *d, Config *c) {
    memset(c, 0, sizeof *c);
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "config must be a dict");
        return -1;
    }
    int arch = 0, head = 1, rope = 0;
    double x;
    if (get_int(d, "arch", &arch, 1, 0) || get_int(d, "compute_head", &head, 0, 1) ||
        get_int(d, "check_finite", &c->check_finite, 0, 1) ||
        get_int(d, "hidden_size", &c->hidden_size, 1, 0) ||
        get_int(d, "intermediate_size", &c->intermediate_size, 1, 0) ||
        get_int(d, "num_hidden_layers", &c->num_layers, 1, 0) ||
        get_int(d, "num_attention_heads", &c->num_heads, 1, 0) ||
        get_int(d, "num_key_value_heads", &c->num_kv_heads, 1, 0) ||
        get_int(d, "head_dim", &c->head_dim, 1, 0) || get_int(d, "vocab_size", &c->vocab_size, 1, 0) ||
        get_int(d, "max_position_embeddings", &c->max_position_embeddings, 1, 0) ||
        get_int(d, "rope_type", &rope, 0, 0) ||
        get_int(d, "rope_original_max_position_embeddings", &c->rope_original_max_pos, 0, 0) ||
        get_int(d, "attention_bias", &c->attention_bias, 0, 0) || get_int(d, "mlp_bias", &c->mlp_bias, 0, 0) ||
        get_int(d, "tie_word_embeddings", &c->tie_word_embeddings, 0, 0) ||
        get_int(d, "num_objectives", &c->num_objectives, 0, 19) ||
        get_int(d, "gating_hidden_dim", &c->gating_hidden_dim, 0, 1024) ||
        get_int(d, "gating_n_hidden", &c->gating_n_hidden, 0, 3) ||
        get_int(d, "num_labels", &c->num_labels, 0, 1) || get_int(d, "qkv_bias", &c->qkv_bias, 0, 0) ||
        get_int(d, "norm_offset", &c->norm_offset, 0, 0) || get_int(d, "qk_norm", &c->qk_norm, 0, 0) ||
        get_int(d, "post_norms", &c->post_norms, 0, 0) || get_int(d, "embed_scale", &c->embed_scale, 0, 0) ||
        get_int(d, "sliding_window", &c->sliding_window, 0, 0))
        return -1;
    int act = 0;
    if (get_int(d, "hidden_act", &act, 0, ACT_SILU)) return -1;
    if (act != ACT_SILU && act != ACT_GELU_TANH) {
        PyErr_SetString(PyExc_ValueError, "config: hidden_act code out of range");
        return -1;
    }
    c->hidden_act = (Activation)act;
    if (config_layers_from_dict(d, c) || config_class_from_dict(d, c)) return -1;
    if (arch < 0 || arch > 3 || rope < 0 || rope > 2) {
        PyErr_SetString(PyExc_ValueError, "config: arch / rope_type out of range");
        return -1;
    }
    c->arch = (Arch)arch;
    c->compute_head = head;
    c->rope_type = (RopeType)rope;
    if (get_num(d, "rms_norm_eps", &x, 1) < 0) return -1;
    c->rms_norm_eps = (float)x;
    if (get_num(d, "rope_theta", &c->rope_theta, 1) < 0) return -1;
    c->rope_factor = c->rope_low_freq_factor = c->rope_high_freq_factor = 1.0;
    if (get_num(d, "rope_factor", &c->rope_factor, 0) < 0 ||
        get_num(d, "rope_low_freq_factor", &c->rope_low_freq_factor, 0) < 0 ||
        get_num(d, "rope_high_freq_factor", &c->rope_high_freq_factor, 0) < 0)
        return -1;
    c->gating_temperature = 10.0f;
    int r = get_num(d, "gating_temperature", &x, 0);
    if (r < 0) return -1;
    if (r == 0) c->gating_temperature = (float)x;
    c->query_pre_attn_scalar = c->head_dim;  // the usual 1/sqrt(head_dim) scale
    if (get_num(d, "query_pre_attn_scalar", &c->query_pre_attn_scalar, 0) < 0) return -1;
    r = get_num(d, "attn_softcap", &x, 0);
    if (r < 0) return -1;
    if (r == 0) c->attn_softcap = (float)x;
    return 0;
}

// ---- Model ----------------------------------------------------------------

static void PyModel_dealloc(PyModel *self) {
    free_cuda(self);
    if (self->loaded) model_free(&self->model);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int PyModel_init(PyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"paths", "config", "dtype", "num_threads", "device", NULL};
    PyObject *paths, *cfgd;
    const char *dtype = "float32";
    int nthreads = 1, device = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|sii", kwlist, &paths, &cfgd, &dtype, &nthreads, &device))
        return -1;
#ifndef ARMORM_WITH_CUDA
    if (device >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "this armorm build has no CUDA backend (" ARMORM_CUDA_BUILD_REASON
                                            "); use device_map='cpu'");
        return -1;
    }
#endif
    if (self->loaded) {
        PyErr_SetString(PyExc_RuntimeError, "Model already initialised");
        return -1;
    }
    WDType wd;
    if (!strcmp(dtype, "auto")) wd = WT_AUTO;
    else if (!strcmp(dtype, "float32")) wd = WT_F32;
    else if (!strcmp(dtype, "bfloat16")) wd = WT_BF16;
    else if (!strcmp(dtype, "float16")) wd = WT_F16;
    else {
        PyErr_Format(PyExc_ValueError, "dtype must be auto, float32, bfloat16 or float16, got '%s'", dtype);
        return -1;
    }
    if (nthreads < 1 || nthreads > 1024) {
        PyErr_Format(PyExc_ValueError, "num_threads must be in 1..1024, got %d", nthreads);
        return -1;
    }
    Config cfg;
    if (config_from_dict(cfgd, &cfg)) return -1;
    PyObject *seq = PySequence_Fast(paths, "paths must be a sequence of str");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > 100000) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "paths must name 1..100000 files");
        return -1;
    }
    const char **cpaths = PyMem_Calloc((size_t)n, sizeof *cpaths);
    PyObject **encoded = PyMem_Calloc((size_t)n, sizeof *encoded);
    int rc = -1;
    if (!cpaths || !encoded) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(seq, i), &encoded[i])) goto done;
        cpaths[i] = PyBytes_AS_STRING(encoded[i]);
    }
    ArmError e = {{0}};
    int lr;
    Py_BEGIN_ALLOW_THREADS
    lr = model_load(&self->model, &cfg, cpaths, (int)n, wd, nthreads, &e);
    Py_END_ALLOW_THREADS
    if (lr) {
        raise_arm(&e);
        goto done;
    }
    self->loaded = 1;
#ifdef ARMORM_WITH_CUDA
    if (device >= 0) {
        int cr;
        Py_BEGIN_ALLOW_THREADS
        cr = cuda_model_create(&self->cuda, &self->model, device, &e);
        Py_END_ALLOW_THREADS
        if (cr) {
            model_free(&self->model);
            self->loaded = 0;
            PyErr_Format(PyExc_RuntimeError, "%s", e.msg);
            goto done;
        }
    }
#endif
    self->device = device;
    rc = 0;
done:
    if (encoded)
        for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(encoded[i]);
    PyMem_Free(encoded);
    PyMem_Free(cpaths);
    Py_DECREF(seq);
    return rc;
}

static int check_loaded(PyModel *self) {
    if (!self->loaded) {
        PyErr_SetString(PyExc_RuntimeError, "model is closed");
        return -1;
    }
    return 0;
}

// Polled by the core between layers, with the GIL released.
static int cancel_check(void *ctx) {
    (void)ctx;
    PyGILState_STATE st = PyGILState_Ensure();
    int r = PyErr_CheckSignals();
    PyGILState_Release(st);
    return r != 0;
}

static PyArrayObject *as_i64_1d(PyObject *o, const char *what) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(o, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY_RO);
    if (!a) PyErr_Format(PyExc_TypeError, "%s must be a 1-D integer array", what);
    return a;
}

// The arrays behind a Batch, converted from Python objects (owned references).
typedef struct {
    PyArrayObject *tok, *cu, *rp, *gp;
} BatchArrays;

static void batch_arrays_clear(BatchArrays *a) {
    Py_CLEAR(a->tok); Py_CLEAR(a->cu); Py_CLEAR(a->rp); Py_CLEAR(a->gp);
}

// Converts and shape-checks a batch; token values and positions are checked by batch_validate.
static int parse_batch(PyObject *tok_o, PyObject *cu_o, PyObject *rp_o, PyObject *gp_o, long long base,
                       BatchArrays *a, Batch *b) {
    memset(a, 0, sizeof *a);
    // Tokens are read as int64 with numpy's safe casting (floats are refused) and range-checked
    // before narrowing: a forced cast to int32 would silently wrap 2**32 to the valid id 0.
    PyArrayObject *t64 = as_i64_1d(tok_o, "tokens");
    if (!t64) return -1;
    npy_intp nt = PyArray_DIM(t64, 0);
    const int64_t *src = PyArray_DATA(t64);
    for (npy_intp i = 0; i < nt; i++)
        if (src[i] < INT32_MIN || src[i] > INT32_MAX) {  // smaller ones: batch_validate names sequence and position
            PyErr_Format(PyExc_ValueError, "tokens[%lld]: token id %lld is outside the embedding",
                         (long long)i, (long long)src[i]);
            Py_DECREF(t64);
            return -1;
        }
    a->tok = (PyArrayObject *)PyArray_FROMANY((PyObject *)t64, NPY_INT32, 1, 1,
                                              NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
    Py_DECREF(t64);
    if (!a->tok) return -1;
    if (!(a->cu = as_i64_1d(cu_o, "cu_seqlens"))) return -1;
    const npy_intp T = PyArray_DIM(a->tok, 0), nb = PyArray_DIM(a->cu, 0) - 1;
    if (nb < 1 || nb > 0x7fffffff) {
        PyErr_SetString(PyExc_ValueError, "cu_seqlens must hold B+1 offsets with B >= 1");
        return -1;
    }
    const int64_t *cus = PyArray_DATA(a->cu);
    if (cus[0] != 0 || cus[nb] != (int64_t)T) {
        PyErr_Format(PyExc_ValueError, "cu_seqlens must run from 0 to the token count %lld", (long long)T);
        return -1;
    }
    for (npy_intp i = 0; i < nb; i++)
        if (cus[i + 1] <= cus[i]) {
            PyErr_Format(PyExc_ValueError, "sequence %lld is empty (cu_seqlens must be strictly increasing)",
                         (long long)(i + base));
            return -1;
        }
    if (rp_o != Py_None) {
        if (!(a->rp = as_i64_1d(rp_o, "reward_pos"))) return -1;
        if (PyArray_DIM(a->rp, 0) != nb) { PyErr_SetString(PyExc_ValueError, "reward_pos must have B entries"); return -1; }
    }
    if (gp_o != Py_None) {
        if (!(a->gp = as_i64_1d(gp_o, "gating_pos"))) return -1;
        if (PyArray_DIM(a->gp, 0) != nb) { PyErr_SetString(PyExc_ValueError, "gating_pos must have B entries"); return -1; }
    }
    *b = (Batch){PyArray_DATA(a->tok), cus, (int)nb, a->rp ? PyArray_DATA(a->rp) : NULL,
                 a->gp ? PyArray_DATA(a->gp) : NULL, (int64_t)base};
    return 0;
}

static PyObject *PyModel_validate(PyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"tokens", "cu_seqlens", "reward_pos", "gating_pos", "index_base", NULL};
    PyObject *tok_o, *cu_o, *rp_o = Py_None, *gp_o = Py_None;
    long long base = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOL", kwlist, &tok_o, &cu_o, &rp_o, &gp_o, &base)) return NULL;
    if (check_loaded(self)) return NULL;
    BatchArrays a;
    Batch b;
    PyObject *res = NULL;
    if (parse_batch(tok_o, cu_o, rp_o, gp_o, base, &a, &b) == 0) {
        ArmError e = {{0}};
        if (batch_validate(&self->model, &b, &e)) raise_arm(&e);
        else {
            Py_INCREF(Py_None);
            res = Py_None;
        }
    }
    batch_arrays_clear(&a);
    return res;
}

static PyObject *PyModel_forward(PyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"tokens", "cu_seqlens", "reward_pos", "gating_pos", "fields", "index_base", NULL};
    PyObject *tok_o, *cu_o, *rp_o = Py_None, *gp_o = Py_None, *fields = NULL;
    long long base = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOOL", kwlist, &tok_o, &cu_o, &rp_o, &gp_o, &fields, &base))
        return NULL;
    if (check_loaded(self)) return NULL;
    const Config *c = &self->model.cfg;
    BatchArrays ba;
    Batch b;
    PyObject *result = NULL, *arrays[7] = {0};
    static const char *names[7] = {"hidden_state", "prompt_embedding", "rewards", "gating_output",
                                   "score", "logits", "all_hidden"};
    if (parse_batch(tok_o, cu_o, rp_o, gp_o, base, &ba, &b)) goto done;
    const npy_intp T = PyArray_DIM(ba.tok, 0), nb = b.B;
    PyArrayObject *gp = ba.gp;
    const npy_intp H = c->hidden_size, K = c->num_objectives, NL = c->num_labels;
    npy_intp shapes[7][2] = {{nb, H}, {nb, H}, {nb, K}, {nb, K}, {nb, 0}, {nb, NL}, {T, H}};
    int ndims[7] = {2, 2, 2, 2, 1, 2, 2};
    int allowed[7] = {1, gp != NULL, c->arch == ARCH_ARMORM, c->arch == ARCH_ARMORM,
                      c->arch == ARCH_ARMORM || c->arch == ARCH_SEQCLS, c->arch == ARCH_SEQCLS, 1};
    float *ptr[7] = {0};
    PyObject *fseq = fields ? PySequence_Fast(fields, "fields must be a sequence of str") : NULL;
    if (fields && !fseq) goto done;
    for (int i = 0; i < 7; i++) {
        int want = 0;
        if (!fseq) {
            want = allowed[i] && i != 6;
        } else {
            for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(fseq); j++) {
                PyObject *s = PySequence_Fast_GET_ITEM(fseq, j);
                if (PyUnicode_Check(s) && PyUnicode_CompareWithASCIIString(s, names[i]) == 0) want = 1;
            }
            if (want && !allowed[i]) {
                Py_DECREF(fseq);
                PyErr_Format(PyExc_ValueError, "field '%s' is not available for this model or batch", names[i]);
                goto done;
            }
        }
        if (!want) continue;
        arrays[i] = PyArray_ZEROS(ndims[i], shapes[i], NPY_FLOAT32, 0);
        if (!arrays[i]) { Py_XDECREF(fseq); goto done; }
        ptr[i] = PyArray_DATA((PyArrayObject *)arrays[i]);
    }
    Py_XDECREF(fseq);
    Outputs out = {ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6]};
    ArmError e = {{0}};
    int r;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
#ifdef ARMORM_WITH_CUDA
    if (self->cuda)
        r = cuda_forward(self->cuda, &self->model, &b, &out, &e);
    else
#endif
        r = forward_cpu(&self->model, &b, &out, cancel_check, NULL, &e);
    Py_END_ALLOW_THREADS
    self->busy--;
#ifdef ARMORM_WITH_CUDA
    if (r == CUDA_ERR_DEVICE) {
        PyErr_Format(PyExc_RuntimeError, "%s", e.msg);
        goto done;
    }
#endif
    if (r == -2) {
        if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
        goto done;
    }
    if (r) { raise_arm(&e); goto done; }
    result = PyDict_New();
    if (!result) goto done;
    for (int i = 0; i < 7; i++)
        if (arrays[i] && PyDict_SetItemString(result, names[i], arrays[i])) { Py_CLEAR(result); goto done; }
done:
    for (int i = 0; i < 7; i++) Py_XDECREF(arrays[i]);
    batch_arrays_clear(&ba);
    return result;
}

static PyObject *tensor_to_array(const StTensor *t) {
    npy_intp dims[ST_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) dims[i] = (npy_intp)t->shape[i];
    PyObject *a = PyArray_SimpleNew(t->ndim, dims, NPY_FLOAT32);
    if (!a) return NULL;
    float *dst = PyArray_DATA((PyArrayObject *)a);
    arm_convert_to_f32(dst, t->data, t->dtype, t->numel);
    return a;
}

static PyObject *PyModel_tensor(PyModel *self, PyObject *arg) {
    if (check_loaded(self)) return NULL;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    const StTensor *t = model_find_tensor(&self->model, name);
    if (!t) return PyErr_Format(PyExc_KeyError, "no tensor named '%s'", name);
    if (t->dtype != ST_F32 && t->dtype != ST_BF16 && t->dtype != ST_F16)
        return PyErr_Format(PyExc_TypeError, "tensor '%s' has dtype %s", name, t->dtype_name);
    return tensor_to_array(t);
}

static PyObject *PyModel_close(PyModel *self, PyObject *unused) {
    (void)unused;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "cannot close a model while a forward call is running");
        return NULL;
    }
    free_cuda(self);
    if (self->loaded) {
        model_free(&self->model);
        self->loaded = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *PyModel_get_closed(PyModel *self, void *c) {
    (void)c;
    return PyBool_FromLong(!self->loaded);
}

static PyObject *PyModel_get_dtype(PyModel *self, void *c) {
    (void)c;
    if (check_loaded(self)) return NULL;
    WDType t = self->model.compute_wdtype;
    return PyUnicode_FromString(t == WT_F32 ? "float32" : t == WT_BF16 ? "bfloat16" : "float16");
}

static PyObject *PyModel_get_kernel(PyModel *self, void *c) {
    (void)c;
    if (check_loaded(self)) return NULL;
    return PyUnicode_FromString(arm_kernel_name(self->model.kernel));
}

static PyObject *PyModel_get_device(PyModel *self, void *c) {
    (void)c;
    if (self->device < 0) return PyUnicode_FromString("cpu");
    return PyUnicode_FromFormat("cuda:%d", self->device);
}

static PyMethodDef PyModel_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))PyModel_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(tokens, cu_seqlens, reward_pos=None, gating_pos=None, fields=None, index_base=0) -> dict of arrays"},
    {"validate", (PyCFunction)(void (*)(void))PyModel_validate, METH_VARARGS | METH_KEYWORDS,
     "validate(tokens, cu_seqlens, reward_pos=None, gating_pos=None, index_base=0): the checks forward makes, "
     "without computing"},
    {"tensor", (PyCFunction)PyModel_tensor, METH_O, "tensor(name) -> float32 copy of a stored tensor"},
    {"close", (PyCFunction)PyModel_close, METH_NOARGS, "unmap the checkpoint and free the weights"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef PyModel_getset[] = {{"closed", (getter)PyModel_get_closed, NULL, "True after close()", NULL},
                                       {"dtype", (getter)PyModel_get_dtype, NULL, "dtype the backbone weights are held in", NULL},
                                       {"kernel", (getter)PyModel_get_kernel, NULL,
                                        "matmul path chosen at load: portable, avx2, avx512 or avx512bf16 "
                                        "(ARMORM_KERNEL forces one)", NULL},
                                       {"device", (getter)PyModel_get_device, NULL, "'cpu' or 'cuda:N'", NULL},
                                       {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject PyModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "armorm._core.Model",
    .tp_basicsize = sizeof(PyModel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(paths, config, dtype='float32', num_threads=1): a mapped, validated checkpoint",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)PyModel_init,
    .tp_dealloc = (destructor)PyModel_dealloc,
    .tp_methods = PyModel_methods,
    .tp_getset = PyModel_getset,
};

// ---- module functions -----------------------------------------------------

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

static PyObject *py_cuda_device_count(PyObject *m, PyObject *unused) {
    (void)m;
    (void)unused;
#ifdef ARMORM_WITH_CUDA
    return PyLong_FromLong(cuda_device_count());
#else
    return PyLong_FromLong(0);
#endif
}

// ---- gemm: op(a) @ op(b) with bf16 operands (training) --------------------

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

static PyMethodDef module_methods[] = {
    {"gemm", (PyCFunction)(void (*)(void))py_gemm, METH_VARARGS | METH_KEYWORDS,
     "gemm(a, b, *, trans_a=False, trans_b=False, out=None, accumulate=False, num_threads=0, kernel=None)\n"
     "-> float32 (M, N) = [out +] op(a) @ op(b); operands float32 or uint16 bf16 bits, rounded to bf16,\n"
     "products summed in fp32 (vdpbf16ps where the CPU has AVX512_BF16, else plain C); num_threads=0: every core"},
    {"adamw_update", (PyCFunction)(void (*)(void))py_adamw_update, METH_VARARGS | METH_KEYWORDS,
     "adamw_update(param, grad, m, v, *, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step,\n"
     "num_threads=1): one torch.optim.AdamW update of float32 arrays, in place; step counts from 1"},
    {"gemm_kernel", py_gemm_kernel, METH_NOARGS, "gemm_kernel() -> 'avx512bf16' or 'portable': gemm's path here"},
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS,
     "cuda_device_count() -> number of usable CUDA devices (0 without a driver, a GPU or a CUDA build)"},
    {"inspect_safetensors", py_inspect_safetensors, METH_O,
     "inspect_safetensors(path) -> list of {name, dtype, shape, data_offsets}; ValueError on a bad file"},
    {"parse_safetensors_bytes", py_parse_safetensors_bytes, METH_O,
     "parse_safetensors_bytes(buf) -> like inspect_safetensors, for an in-memory file (fuzzing)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "armorm._core",
                                       "armorm's C core: checkpoint loading and the forward pass.", -1,
                                       module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    if (PyType_Ready(&PyModelType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&moduledef);
    if (!mod) return NULL;
    Py_INCREF(&PyModelType);
    if (PyModule_AddObject(mod, "Model", (PyObject *)&PyModelType) < 0) {
        Py_DECREF(&PyModelType);
        Py_DECREF(mod);
        return NULL;
    }
    PyModule_AddIntConstant(mod, "ARCH_BACKBONE", ARCH_BACKBONE);
    PyModule_AddIntConstant(mod, "ARCH_ARMORM", ARCH_ARMORM);
    PyModule_AddIntConstant(mod, "ARCH_SEQCLS", ARCH_SEQCLS);
    PyModule_AddIntConstant(mod, "ARCH_CAUSALLM", ARCH_CAUSALLM);
    PyModule_AddIntConstant(mod, "ROPE_DEFAULT", ROPE_DEFAULT);
    PyModule_AddIntConstant(mod, "ROPE_LLAMA3", ROPE_LLAMA3);
    PyModule_AddIntConstant(mod, "ROPE_LINEAR", ROPE_LINEAR);
    PyModule_AddIntConstant(mod, "ACT_SILU", ACT_SILU);
    PyModule_AddIntConstant(mod, "ACT_GELU_TANH", ACT_GELU_TANH);
#ifdef ARMORM_WITH_CUDA
    PyModule_AddIntConstant(mod, "CUDA_BUILT", 1);
#else
    PyModule_AddIntConstant(mod, "CUDA_BUILT", 0);
#endif
    PyModule_AddStringConstant(mod, "CUDA_BUILD_REASON", ARMORM_CUDA_BUILD_REASON);
    return mod;
}
