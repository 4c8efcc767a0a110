// binding.h: what the files of armorm._core (the CPython binding) share.
//
// NumPy's C API table is imported once, in module.c (ARMORM_BINDING_IMPORTS_ARRAY);
// the other files reach it through the same unique symbol.
#ifndef ARMORM_PY_BINDING_H
#define ARMORM_PY_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL armorm_core_ARRAY_API
#ifndef ARMORM_BINDING_IMPORTS_ARRAY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "../model.h"

// The core's error as a Python exception (MemoryError for "out of memory ...",
// else ValueError); returns NULL.
PyObject *raise_arm(const ArmError *e);

// Each file adds its part of the module; 0 or -1 with an exception set.
int add_safetensors_api(PyObject *mod);   // safetensors_file.c
int add_numeric_functions(PyObject *mod); // numeric.c

#endif
