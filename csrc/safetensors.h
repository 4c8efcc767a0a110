// safetensors.h: memory-map one .safetensors file and parse its header.
//
// The header is untrusted input (checkpoints come from the internet), so the
// parser validates everything before any tensor is touched: the 8-byte length
// prefix, header size limits, UTF-8 JSON syntax, per-tensor dtype / shape /
// data_offsets, integer overflow in numel * itemsize, offsets inside the data
// section, no duplicate names and no overlapping byte ranges. Unknown dtypes are
// kept (dtype = ST_OTHER, dtype_name holds the string) so that the model loader
// can name the tensor in its error. Nothing here is model-specific.
#ifndef ARMORM_SAFETENSORS_H
#define ARMORM_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER_BYTES (100u * 1024u * 1024u)  // same cap as the reference reader

typedef enum {
    ST_F32 = 0, ST_BF16, ST_F16, ST_F64, ST_I64, ST_I32, ST_I16, ST_I8, ST_U8, ST_BOOL,
    ST_F8_E4M3, ST_F8_E5M2, ST_U16, ST_U32, ST_U64, ST_OTHER
} StDType;

typedef struct {
    char *name;            // NUL-terminated, owned (malloc)
    StDType dtype;
    char dtype_name[16];   // as written in the header ("F32", "BF16", ...), truncated
    int ndim;              // 0..ST_MAX_DIMS
    int64_t shape[ST_MAX_DIMS];
    uint64_t numel;        // product of shape (1 for ndim 0)
    uint64_t begin, end;   // data_offsets, relative to the data section
    const void *data;      // points into the mapping: base + 8 + header_len + begin
} StTensor;

// One __metadata__ entry (JSON strings, decoded: may hold NUL bytes, hence the lengths).
typedef struct {
    char *key, *value;     // owned, NUL-terminated
    size_t key_len, value_len;
} StMeta;

typedef struct {
    char *path;            // owned copy
    int fd;                // -1 when closed
    void *map;             // whole-file read-only mapping
    size_t map_size;       // file size
    uint64_t header_len;
    StTensor *tensors;     // owned array, sorted by name
    int n_tensors;
    StMeta *meta;          // owned array, in header order
    int n_meta;
} StFile;

// Returns the element size in bytes for a known dtype, 0 for ST_OTHER.
size_t st_dtype_size(StDType dt);

// Open, map and parse `path`. On failure returns -1, writes a message naming the
// file and the defect into err (always NUL-terminated), and leaves *f closed
// (st_close on it is safe). On success returns 0.
int st_open(StFile *f, const char *path, char *err, size_t errlen);

// Parse an in-memory copy of a whole file (used by the fuzz harness and tests):
// same checks as st_open; `data` must outlive f; f->fd stays -1, f->map is NULL
// and tensors point into `data`.
int st_parse_buffer(StFile *f, const void *data, size_t size, const char *label,
                    char *err, size_t errlen);

// Writes "[d0, d1, ...]" into out (always NUL-terminated; cut when cap is short).
void st_fmt_shape(char *out, size_t cap, int ndim, const int64_t *shape);

// Binary search by name; NULL when absent.
const StTensor *st_find(const StFile *f, const char *name);

// Unmap, close and free everything; safe on a zeroed or already-closed StFile.
void st_close(StFile *f);

#endif
