// libFuzzer harness for csrc/safetensors.c.
//
// Each input is parsed twice: once as a whole file (8-byte length prefix
// included), and once as a bare header wrapped into a file with a correct
// prefix and a small data section, so that the fuzzer spends its time in the
// JSON / schema code rather than on guessing the length prefix. On success the
// harness checks the documented invariants and touches every tensor's first
// and last byte, and every metadata string's last, so that ASan catches a bad
// pointer or length.
#include "../../csrc/safetensors.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WRAP_DATA_BYTES 64

static void check(const StFile *f, const unsigned char *buf, size_t size) {
    volatile unsigned char sink = 0;
    if (f->fd != -1 || f->map != NULL || f->n_tensors < 0) abort();
    if (f->n_tensors > 0 && f->tensors == NULL) abort();
    if (f->header_len == 0 || f->header_len > size - 8) abort();
    uint64_t data_size = size - 8 - f->header_len;
    const unsigned char *data = buf + 8 + f->header_len;
    for (int i = 0; i < f->n_tensors; i++) {
        const StTensor *t = &f->tensors[i];
        if (!t->name || t->name[0] == '\0' || strlen(t->name) > 1024) abort();
        if (i > 0 && strcmp(f->tensors[i - 1].name, t->name) >= 0) abort();  // sorted, unique
        if (st_find(f, t->name) != t) abort();
        if (t->ndim < 0 || t->ndim > ST_MAX_DIMS) abort();
        if (t->begin > t->end || t->end > data_size) abort();
        if ((const unsigned char *)t->data != data + t->begin) abort();
        if (memchr(t->dtype_name, '\0', sizeof t->dtype_name) == NULL) abort();
        size_t isz = st_dtype_size(t->dtype);
        if (isz && t->end - t->begin != t->numel * isz) abort();
        for (int d = 0; d < t->ndim; d++)
            if (t->shape[d] < 0) abort();
        if (t->end > t->begin) {
            const unsigned char *p = t->data;
            sink ^= p[0];
            sink ^= p[t->end - t->begin - 1];
        }
        // pairwise overlap check (inputs are small)
        for (int j = 0; j < i; j++) {
            const StTensor *u = &f->tensors[j];
            if (t->begin == t->end || u->begin == u->end) continue;
            if (t->begin < u->end && u->begin < t->end) abort();
        }
    }
    // metadata: owned, NUL-terminated strings of the stated lengths, no longer than the header
    if (f->n_meta < 0 || (f->n_meta > 0 && f->meta == NULL)) abort();
    for (int i = 0; i < f->n_meta; i++) {
        const StMeta *m = &f->meta[i];
        if (!m->key || !m->value || m->key_len > f->header_len || m->value_len > f->header_len) abort();
        if (m->key[m->key_len] != '\0' || m->value[m->value_len] != '\0') abort();
        if (m->key_len) sink ^= (unsigned char)m->key[m->key_len - 1];
        if (m->value_len) sink ^= (unsigned char)m->value[m->value_len - 1];
    }
    (void)sink;
}

static void run(const unsigned char *buf, size_t size) {
    StFile f;
    char err[256];
    memset(err, 'X', sizeof err);
    if (st_parse_buffer(&f, buf, size, "fuzz.safetensors", err, sizeof err) == 0) {
        check(&f, buf, size);
    } else {
        if (memchr(err, '\0', sizeof err) == NULL) abort();
        if (strncmp(err, "fuzz.safetensors: ", 18) != 0) abort();
        if (f.tensors != NULL || f.n_tensors != 0 || f.meta != NULL || f.n_meta != 0) abort();
    }
    st_close(&f);
    st_close(&f);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    run(data, size);

    if (size == 0 || size > ST_MAX_HEADER_BYTES) return 0;
    size_t total = 8 + size + WRAP_DATA_BYTES;
    unsigned char *buf = malloc(total);
    if (!buf) return 0;
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)size >> (8 * i));
    memcpy(buf + 8, data, size);
    for (size_t i = 0; i < WRAP_DATA_BYTES; i++) buf[8 + size + i] = (unsigned char)i;
    run(buf, total);
    free(buf);
    return 0;
}
