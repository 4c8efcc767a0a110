// module.c: armorm._core, the CPython face of the core: the module and its Model type.
//
// Model(paths, config, dtype, num_threads) maps and validates a checkpoint;
// Model.forward(...) checks a whole call once, then runs it in packed groups
// with the GIL released and returns a dict of NumPy arrays. Every C error
// becomes a Python exception carrying the core's message: ValueError for bad
// checkpoints and inputs, MemoryError for allocation failures,
// KeyboardInterrupt when Ctrl-C arrives mid-batch. The other files of this
// folder add the safetensors reader (safetensors_file.c) and the array
// operations training uses (numeric.c).
#define ARMORM_BINDING_IMPORTS_ARRAY
#include "binding.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef ARMORM_WITH_CUDA
#include "../cuda/backend_cuda.h"
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

PyObject *raise_arm(const ArmError *e) {
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
        get_int(d, "check_finite", &c->check_finite, 0, 1) || get_int(d, "prepack", &c->prepack, 0, -1) ||
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
        get_int(d, "num_objectives", &c->num_objectives, 0, DEFAULT_NUM_OBJECTIVES) ||
        get_int(d, "gating_hidden_dim", &c->gating_hidden_dim, 0, DEFAULT_GATING_HIDDEN_DIM) ||
        get_int(d, "gating_n_hidden", &c->gating_n_hidden, 0, DEFAULT_GATING_N_HIDDEN) ||
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
    c->gating_temperature = (float)DEFAULT_GATING_TEMPERATURE;
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
    if (device >= 0) {  // the GPU holds its own copy (bf16, cuBLAS): the host's is only read while uploading
        if (cfg.prepack > 0) {
            PyErr_SetString(PyExc_ValueError, "prepack applies to the CPU engine; a model on a GPU is not prepacked");
            return -1;
        }
        cfg.prepack = 0;
    }
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
    PyArrayObject *tok, *cu, *rp, *gp, *par;
} BatchArrays;

static void batch_arrays_clear(BatchArrays *a) {
    Py_CLEAR(a->tok); Py_CLEAR(a->cu); Py_CLEAR(a->rp); Py_CLEAR(a->gp); Py_CLEAR(a->par);
}

// Converts and shape-checks a batch; token values and positions are checked by batch_validate.
static int parse_batch(PyObject *tok_o, PyObject *cu_o, PyObject *rp_o, PyObject *gp_o, PyObject *par_o,
                       long long base, BatchArrays *a, Batch *b) {
    memset(a, 0, sizeof *a);
    if (PyArray_Check(tok_o) && PyArray_TYPE((PyArrayObject *)tok_o) == NPY_INT32) {
        // int32 ids, as armorm.model hands them: taken as they are (no copy when contiguous)
        a->tok = (PyArrayObject *)PyArray_FROMANY(tok_o, NPY_INT32, 1, 1, NPY_ARRAY_CARRAY_RO);
        if (!a->tok) PyErr_Format(PyExc_TypeError, "tokens must be a 1-D integer array");
    } else {
        // Other ids are read as int64 with numpy's safe casting (floats are refused) and range-checked
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
    }
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
    if (par_o != Py_None) {  // values are checked by batch_validate
        PyArrayObject *p64 = as_i64_1d(par_o, "parent");
        if (!p64) return -1;
        if (PyArray_DIM(p64, 0) != nb) {
            Py_DECREF(p64);
            PyErr_SetString(PyExc_ValueError, "parent must have B entries");
            return -1;
        }
        const int64_t *pv = PyArray_DATA(p64);
        for (npy_intp i = 0; i < nb; i++)
            if (pv[i] < -1 || pv[i] >= i) {
                PyErr_Format(PyExc_ValueError, "sequence %lld: parent %lld must be -1 or an earlier sequence of the "
                             "batch", (long long)(i + base), (long long)pv[i]);
                Py_DECREF(p64);
                return -1;
            }
        a->par = (PyArrayObject *)PyArray_FROMANY((PyObject *)p64, NPY_INT32, 1, 1,
                                                  NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
        Py_DECREF(p64);
        if (!a->par) return -1;
    }
    *b = (Batch){PyArray_DATA(a->tok), cus, (int)nb, a->rp ? PyArray_DATA(a->rp) : NULL,
                 a->gp ? PyArray_DATA(a->gp) : NULL, (int64_t)base, a->par ? PyArray_DATA(a->par) : NULL};
    return 0;
}

static PyObject *PyModel_validate(PyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"tokens", "cu_seqlens", "reward_pos", "gating_pos", "index_base", "parent", NULL};
    PyObject *tok_o, *cu_o, *rp_o = Py_None, *gp_o = Py_None, *par_o = Py_None;
    long long base = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOLO", kwlist, &tok_o, &cu_o, &rp_o, &gp_o, &base, &par_o))
        return NULL;
    if (check_loaded(self)) return NULL;
    BatchArrays a;
    Batch b;
    PyObject *res = NULL;
    if (parse_batch(tok_o, cu_o, rp_o, gp_o, par_o, base, &a, &b) == 0) {
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

// A field list (None: the model's default for a batch with or without gating
// positions) as FIELD_BIT()s; a name the model does not produce is a ValueError
// listing those it does.
static int parse_fields(const Config *c, PyObject *fields, int have_gating_pos, unsigned *bits) {
    if (!fields || fields == Py_None) {
        *bits = model_default_fields(c, have_gating_pos);
        return 0;
    }
    PyObject *seq = PyUnicode_Check(fields) ? NULL : PySequence_Fast(fields, "fields must be a sequence of str");
    if (!seq) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "fields must be a sequence of str");
        }
        return -1;
    }
    *bits = 0;
    int rc = 0;
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(seq) && rc == 0; j++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq, j);
        const char *name = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
        if (!name) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "fields must be a sequence of str");
            rc = -1;
            break;
        }
        const int f = field_from_name(name);
        if (f < 0) {
            ArmError e = {{0}};
            field_unavailable(c, name, &e);
            raise_arm(&e);
            rc = -1;
        } else {
            *bits |= FIELD_BIT(f);
        }
    }
    Py_DECREF(seq);
    return rc;
}

static PyObject *PyModel_plan(PyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fields", NULL};
    PyObject *fields = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O", kwlist, &fields)) return NULL;
    if (check_loaded(self)) return NULL;
    const Config *c = &self->model.cfg;
    unsigned bits;
    OutputPlan p;
    ArmError e = {{0}};
    if (parse_fields(c, fields, 1, &bits)) return NULL;
    if (output_plan(c, bits, &p, &e)) return raise_arm(&e);
    PyObject *names = PyTuple_New(__builtin_popcount(p.fields));
    if (!names) return NULL;
    for (int f = 0, i = 0; f < N_FIELDS; f++)
        if (p.fields & FIELD_BIT(f)) {
            PyObject *n = PyUnicode_FromString(field_names[f]);
            if (!n) { Py_DECREF(names); return NULL; }
            PyTuple_SET_ITEM(names, i++, n);
        }
    return Py_BuildValue("(NO)", names, p.gating ? Py_True : Py_False);
}

// 1 when the calling thread (holding the GIL) is Python's main thread, the only one that runs signal
// handlers; 0 otherwise or when that cannot be told (the error is cleared: polling is an optimisation).
static int on_main_thread(void) {
    PyObject *threading = PyImport_ImportModule("threading");
    PyObject *main = threading ? PyObject_CallMethod(threading, "main_thread", NULL) : NULL;
    PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
    const int yes = ident && PyLong_Check(ident) &&
                    PyLong_AsUnsignedLong(ident) == PyThread_get_thread_ident();
    Py_XDECREF(ident);
    Py_XDECREF(main);
    Py_XDECREF(threading);
    PyErr_Clear();
    return yes;
}

// One packed group of the call on the model's backend, with the GIL released; `cancel` polled on the CPU.
static int run_backend(PyModel *self, const Batch *b, const OutputPlan *p, Outputs *o, CancelFn cancel,
                       ArmError *e) {
    int r;
    Py_BEGIN_ALLOW_THREADS
#ifdef ARMORM_WITH_CUDA
    if (self->cuda)
        r = cuda_forward(self->cuda, &self->model, b, p, o, e);
    else
#endif
        r = forward_cpu(&self->model, b, p, o, cancel, NULL, e);
    Py_END_ALLOW_THREADS
    return r;
}

static PyObject *PyModel_forward(PyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"tokens", "cu_seqlens", "reward_pos", "gating_pos", "fields", "index_base",
                             "batch_tokens", "progress", "parent", "groups", NULL};
    PyObject *tok_o, *cu_o, *rp_o = Py_None, *gp_o = Py_None, *fields = Py_None, *progress = Py_None;
    PyObject *par_o = Py_None, *groups_o = Py_None;
    long long base = 0, budget = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOOL$LOOO", kwlist, &tok_o, &cu_o, &rp_o, &gp_o, &fields, &base,
                                     &budget, &progress, &par_o, &groups_o))
        return NULL;
    if (check_loaded(self)) return NULL;
    if (progress != Py_None && !PyCallable_Check(progress))
        return PyErr_Format(PyExc_TypeError, "progress must be callable or None");
    const Config *c = &self->model.cfg;
    BatchArrays ba;
    Batch b;
    OutputPlan plan;
    ArmError e = {{0}};
    PyObject *result = NULL, *arrays[N_FIELDS] = {0};
    PyArrayObject *groups = NULL;
    int64_t *cu = NULL;
    int32_t *par = NULL;
    unsigned bits;
    if (parse_batch(tok_o, cu_o, rp_o, gp_o, par_o, base, &ba, &b)) goto done;
    if (parse_fields(c, fields, b.gating_pos != NULL, &bits)) goto done;
    if (groups_o != Py_None && !(groups = as_i64_1d(groups_o, "groups"))) goto done;
    // every check, on the whole call, before any compute
    if (output_plan(c, bits, &plan, &e) || batch_check(&self->model, &b, &plan, &e) ||
        (groups && batch_check_groups(&b, PyArray_DATA(groups), PyArray_DIM(groups, 0), &e))) {
        raise_arm(&e);
        goto done;
    }
    const int64_t T = b.cu_seqlens[b.B];
    int64_t row[N_FIELDS];  // floats per sequence (per token for all_hidden)
    for (int f = 0; f < N_FIELDS; f++) {
        if (!(plan.fields & FIELD_BIT(f))) continue;
        int64_t shape[2];
        const int nd = output_shape(c, (Field)f, b.B, T, shape);
        npy_intp dims[2] = {(npy_intp)shape[0], nd > 1 ? (npy_intp)shape[1] : 0};
        row[f] = nd > 1 ? shape[1] : 1;
        if (!(arrays[f] = PyArray_ZEROS(nd, dims, NPY_FLOAT32, 0))) goto done;
    }
    cu = PyMem_Malloc(sizeof *cu * (size_t)(b.B + 1));
    par = b.parent ? PyMem_Malloc(sizeof *par * (size_t)b.B) : NULL;
    if (!cu || (b.parent && !par)) { PyErr_NoMemory(); goto done; }
    // packed groups (given, or of at most batch_tokens tokens; 0: the whole call at once), each run on the backend
    self->busy++;
    // Signals are polled only on the main thread: elsewhere (a server's scheduler thread) PyErr_CheckSignals
    // does nothing, and taking the GIL for it between attention slices would hold every OpenMP thread at
    // the next barrier while other Python threads hold the GIL.
    const CancelFn cancel = on_main_thread() ? cancel_check : NULL;
    int r = 0;
    for (int first = 0, end, gi = 0; first < b.B && r == 0; first = end, gi++) {
        end = groups ? (int)((const int64_t *)PyArray_DATA(groups))[gi]
              : budget > 0 ? batch_next_group(&b, first, budget) : b.B;
        const int64_t t0 = b.cu_seqlens[first];
        for (int i = first; i <= end; i++) cu[i - first] = b.cu_seqlens[i] - t0;
        for (int i = first; par && i < end; i++) par[i - first] = b.parent[i] < 0 ? -1 : b.parent[i] - first;
        const Batch g = {b.tokens + t0, cu, end - first, b.reward_pos ? b.reward_pos + first : NULL,
                         b.gating_pos ? b.gating_pos + first : NULL, b.index_base + first, par};
        Outputs o = {0};
        for (int f = 0; f < N_FIELDS; f++)
            if (arrays[f])
                *outputs_slot(&o, (Field)f) = (float *)PyArray_DATA((PyArrayObject *)arrays[f]) +
                                              (f == FIELD_ALL_HIDDEN ? t0 : first) * row[f];
        r = run_backend(self, &g, &plan, &o, cancel, &e);
        if (r == 0 && progress != Py_None) {
            PyObject *pr = PyObject_CallFunction(progress, "ii", end, b.B);
            if (pr) Py_DECREF(pr);
            else r = -4;  // the callback raised
        }
    }
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
    if (r == -4) goto done;
    if (r) { raise_arm(&e); goto done; }
    result = PyDict_New();
    if (!result) goto done;
    for (int f = 0; f < N_FIELDS; f++)
        if (arrays[f] && PyDict_SetItemString(result, field_names[f], arrays[f])) { Py_CLEAR(result); goto done; }
done:
    for (int f = 0; f < N_FIELDS; f++) Py_XDECREF(arrays[f]);
    PyMem_Free(cu);
    PyMem_Free(par);
    Py_XDECREF(groups);
    batch_arrays_clear(&ba);
    return result;
}

static PyObject *PyModel_get_fields(PyModel *self, void *unused) {
    (void)unused;
    if (check_loaded(self)) return NULL;
    const unsigned bits = model_fields(&self->model.cfg);
    PyObject *names = PyTuple_New(__builtin_popcount(bits));
    if (!names) return NULL;
    for (int f = 0, i = 0; f < N_FIELDS; f++)
        if (bits & FIELD_BIT(f)) {
            PyObject *n = PyUnicode_FromString(field_names[f]);
            if (!n) { Py_DECREF(names); return NULL; }
            PyTuple_SET_ITEM(names, i++, n);
        }
    return names;
}

static PyObject *tensor_to_array(const StTensor *t) {
    npy_intp dims[ST_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) dims[i] = (npy_intp)t->shape[i];
    PyObject *a = PyArray_SimpleNew(t->ndim, dims, NPY_FLOAT32);
    if (!a) return NULL;
    float *dst = PyArray_DATA((PyArrayObject *)a);
    // a tensor at an address its element size does not divide is read through an aligned copy
    // (typed loads from it are undefined behaviour; safetensors does not promise alignment)
    const size_t esize = t->dtype == ST_F32 ? 4 : 2;
    void *copy = NULL;
    const void *src = t->data;
    if ((uintptr_t)src % esize) {
        copy = malloc(t->numel * esize + 1);
        if (!copy) {
            Py_DECREF(a);
            return PyErr_NoMemory();
        }
        memcpy(copy, src, t->numel * esize);
        src = copy;
    }
    arm_convert_to_f32(dst, src, t->dtype, t->numel);
    free(copy);
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

static PyObject *PyModel_get_prepacked(PyModel *self, void *c) {
    (void)c;
    if (check_loaded(self)) return NULL;
    return PyBool_FromLong(self->model.packed.bytes > 0);
}

static PyObject *PyModel_get_prepacked_bytes(PyModel *self, void *c) {
    (void)c;
    if (check_loaded(self)) return NULL;
    return PyLong_FromSize_t(self->model.packed.bytes);
}

static PyObject *PyModel_get_device(PyModel *self, void *c) {
    (void)c;
    if (self->device < 0) return PyUnicode_FromString("cpu");
    return PyUnicode_FromFormat("cuda:%d", self->device);
}

static PyMethodDef PyModel_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))PyModel_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(tokens, cu_seqlens, reward_pos=None, gating_pos=None, fields=None, index_base=0, *, batch_tokens=0,\n"
     "progress=None, parent=None, groups=None) -> dict of arrays, one row per sequence. Checks the whole call,\n"
     "then runs it in packed groups of consecutive sequences of at most batch_tokens tokens (0: one group; a\n"
     "longer sequence runs alone; a shared prefix stays with its continuations), or in the groups ending at\n"
     "the sequence counts `groups`, calling progress(sequences_done, sequences_total) after each.\n"
     "parent[b]: the earlier sequence b continues (a shared prefix, docs/best_of_n.md), or -1."},
    {"plan", (PyCFunction)(void (*)(void))PyModel_plan, METH_VARARGS | METH_KEYWORDS,
     "plan(fields=None) -> (fields, needs_gating_positions): what forward computes for `fields` (None: the\n"
     "model's default) and whether it reads the gating positions; ValueError for a field the model lacks"},
    {"validate", (PyCFunction)(void (*)(void))PyModel_validate, METH_VARARGS | METH_KEYWORDS,
     "validate(tokens, cu_seqlens, reward_pos=None, gating_pos=None, index_base=0, parent=None): the checks forward "
     "makes, without computing"},
    {"tensor", (PyCFunction)PyModel_tensor, METH_O, "tensor(name) -> float32 copy of a stored tensor"},
    {"close", (PyCFunction)PyModel_close, METH_NOARGS, "unmap the checkpoint and free the weights"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef PyModel_getset[] = {{"closed", (getter)PyModel_get_closed, NULL, "True after close()", NULL},
                                       {"dtype", (getter)PyModel_get_dtype, NULL, "dtype the backbone weights are held in", NULL},
                                       {"kernel", (getter)PyModel_get_kernel, NULL,
                                        "matmul path chosen at load: portable, avx2, avx512 or avx512bf16 "
                                        "(ARMORM_KERNEL forces one)", NULL},
                                       {"device", (getter)PyModel_get_device, NULL, "'cpu' or 'cuda:N'", NULL},
                                       {"prepacked", (getter)PyModel_get_prepacked, NULL,
                                        "True when the backbone matrices are held in the GEMM kernel's packed "
                                        "layout (config 'prepack'; docs/model.md, 'Prepacked weights')", NULL},
                                       {"prepacked_bytes", (getter)PyModel_get_prepacked_bytes, NULL,
                                        "bytes of the prepacked matrices (0 when not prepacked)", NULL},
                                       {"fields", (getter)PyModel_get_fields, NULL,
                                        "the output fields this model produces, in the order forward returns them",
                                        NULL},
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

static PyObject *py_cuda_device_count(PyObject *m, PyObject *unused) {
    (void)m;
    (void)unused;
#ifdef ARMORM_WITH_CUDA
    return PyLong_FromLong(cuda_device_count());
#else
    return PyLong_FromLong(0);
#endif
}

static PyMethodDef module_methods[] = {
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS,
     "cuda_device_count() -> number of usable CUDA devices (0 without a driver, a GPU or a CUDA build)"},
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
    if (add_safetensors_api(mod) || add_numeric_functions(mod)) {
        Py_DECREF(mod);
        return NULL;
    }
    PyObject *heads = Py_BuildValue("{s:i,s:d,s:i,s:i}", "num_objectives", DEFAULT_NUM_OBJECTIVES,
                                    "gating_temperature", DEFAULT_GATING_TEMPERATURE, "gating_hidden_dim",
                                    DEFAULT_GATING_HIDDEN_DIM, "gating_n_hidden", DEFAULT_GATING_N_HIDDEN);
    if (!heads || PyModule_AddObject(mod, "HEAD_DEFAULTS", heads) < 0) {
        Py_XDECREF(heads);
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
