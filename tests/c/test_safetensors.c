// Standalone tests for csrc/safetensors.c: builds files in memory (and a few on
// disk for st_open) and checks acceptance, rejection and error messages.
#define _POSIX_C_SOURCE 200809L

#include "../../csrc/safetensors.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int g_pass, g_fail;

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (cond) {                                                          \
            g_pass++;                                                        \
        } else {                                                             \
            g_fail++;                                                        \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);  \
        }                                                                    \
    } while (0)

// A whole file in memory: 8-byte LE header length, header, data section.
typedef struct {
    unsigned char *buf;
    size_t size;
} Buf;

static Buf make_raw(const char *hdr, size_t hlen, uint64_t declared, size_t data_size) {
    Buf b;
    b.size = 8 + hlen + data_size;
    b.buf = malloc(b.size ? b.size : 1);
    if (!b.buf) abort();
    for (int i = 0; i < 8; i++) b.buf[i] = (unsigned char)(declared >> (8 * i));
    if (hlen) memcpy(b.buf + 8, hdr, hlen);
    for (size_t i = 0; i < data_size; i++) b.buf[8 + hlen + i] = (unsigned char)(i * 7 + 1);
    return b;
}

static Buf make(const char *json, size_t data_size) {
    size_t n = strlen(json);
    return make_raw(json, n, n, data_size);
}

// Parse json + data_size bytes of data; expect failure with `sub` in the message.
static void expect_err_at(const char *json, size_t data_size, const char *sub, int line) {
    Buf b = make(json, data_size);
    StFile f;
    char err[512];
    memset(err, 'X', sizeof err);
    int rc = st_parse_buffer(&f, b.buf, b.size, "t.safetensors", err, sizeof err);
    int ok = rc == -1 && memchr(err, '\0', sizeof err) && strstr(err, sub) && strncmp(err, "t.safetensors: ", 15) == 0 &&
             f.tensors == NULL && f.n_tensors == 0 && f.fd == -1 && f.map == NULL;
    if (ok) {
        g_pass++;
    } else {
        g_fail++;
        fprintf(stderr, "FAIL line %d: rc=%d want substring '%s'\n  json: %.200s\n  err:  %.300s\n", line, rc, sub,
                json, rc == -1 ? err : "(none)");
    }
    st_close(&f);
    free(b.buf);
}
#define EXPECT_ERR(json, ds, sub) expect_err_at(json, ds, sub, __LINE__)

static void expect_ok_at(const char *json, size_t data_size, int n_tensors, int line) {
    Buf b = make(json, data_size);
    StFile f;
    char err[512];
    int rc = st_parse_buffer(&f, b.buf, b.size, "t.safetensors", err, sizeof err);
    if (rc == 0 && f.n_tensors == n_tensors) {
        g_pass++;
    } else {
        g_fail++;
        fprintf(stderr, "FAIL line %d: rc=%d n=%d want %d\n  json: %.200s\n  err:  %.300s\n", line, rc, f.n_tensors,
                n_tensors, json, rc ? err : "");
    }
    st_close(&f);
    free(b.buf);
}
#define EXPECT_OK(json, ds, n) expect_ok_at(json, ds, n, __LINE__)

static void test_valid(void) {
    const char *json =
        "{\"b.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
        "\"a.bias\":{\"shape\":[4],\"data_offsets\":[24,32],\"dtype\":\"BF16\"},"
        "\"c\":{\"data_offsets\":[32,34],\"dtype\":\"F16\",\"shape\":[]}}";
    Buf b = make(json, 34);
    size_t hlen = strlen(json);
    StFile f;
    char err[256];
    int rc = st_parse_buffer(&f, b.buf, b.size, "ok.safetensors", err, sizeof err);
    CHECK(rc == 0);
    if (rc != 0) {
        fprintf(stderr, "  err: %s\n", err);
        free(b.buf);
        return;
    }
    CHECK(f.n_tensors == 3);
    CHECK(f.fd == -1);
    CHECK(f.map == NULL);
    CHECK(f.header_len == hlen);
    CHECK(strcmp(f.tensors[0].name, "a.bias") == 0);
    CHECK(strcmp(f.tensors[1].name, "b.weight") == 0);
    CHECK(strcmp(f.tensors[2].name, "c") == 0);

    const StTensor *a = st_find(&f, "a.bias");
    const StTensor *w = st_find(&f, "b.weight");
    const StTensor *c = st_find(&f, "c");
    CHECK(a == &f.tensors[0]);
    CHECK(w == &f.tensors[1]);
    CHECK(c == &f.tensors[2]);
    CHECK(st_find(&f, "missing") == NULL);
    CHECK(st_find(&f, "") == NULL);
    CHECK(st_find(&f, "b.weigh") == NULL);
    CHECK(st_find(&f, NULL) == NULL);
    CHECK(st_find(NULL, "c") == NULL);

    const unsigned char *data = b.buf + 8 + hlen;
    CHECK(w->dtype == ST_F32 && strcmp(w->dtype_name, "F32") == 0);
    CHECK(w->ndim == 2 && w->shape[0] == 2 && w->shape[1] == 3 && w->numel == 6);
    CHECK(w->begin == 0 && w->end == 24);
    CHECK(w->data == data);
    CHECK(a->dtype == ST_BF16 && strcmp(a->dtype_name, "BF16") == 0);
    CHECK(a->ndim == 1 && a->shape[0] == 4 && a->numel == 4);
    CHECK(a->data == data + 24);
    CHECK(c->dtype == ST_F16 && strcmp(c->dtype_name, "F16") == 0);
    CHECK(c->ndim == 0 && c->numel == 1);
    CHECK(c->data == data + 32);
    CHECK(((const unsigned char *)c->data)[1] == (unsigned char)(33 * 7 + 1));

    st_close(&f);
    CHECK(f.tensors == NULL && f.n_tensors == 0 && f.path == NULL && f.fd == -1);
    st_close(&f);  // safe twice
    CHECK(f.tensors == NULL);
    free(b.buf);
}

static void test_dtype_sizes(void) {
    CHECK(st_dtype_size(ST_F32) == 4);
    CHECK(st_dtype_size(ST_BF16) == 2);
    CHECK(st_dtype_size(ST_F16) == 2);
    CHECK(st_dtype_size(ST_F64) == 8);
    CHECK(st_dtype_size(ST_I64) == 8);
    CHECK(st_dtype_size(ST_I32) == 4);
    CHECK(st_dtype_size(ST_I16) == 2);
    CHECK(st_dtype_size(ST_I8) == 1);
    CHECK(st_dtype_size(ST_U8) == 1);
    CHECK(st_dtype_size(ST_BOOL) == 1);
    CHECK(st_dtype_size(ST_F8_E4M3) == 1);
    CHECK(st_dtype_size(ST_F8_E5M2) == 1);
    CHECK(st_dtype_size(ST_U16) == 2);
    CHECK(st_dtype_size(ST_U32) == 4);
    CHECK(st_dtype_size(ST_U64) == 8);
    CHECK(st_dtype_size(ST_OTHER) == 0);
}

static void test_length_prefix(void) {
    StFile f;
    char err[256];
    unsigned char small[8] = {0};
    // shorter than 8 bytes (including empty)
    CHECK(st_parse_buffer(&f, small, 0, "s.st", err, sizeof err) == -1 && strstr(err, "shorter than"));
    CHECK(strncmp(err, "s.st: ", 6) == 0);
    st_close(&f);
    CHECK(st_parse_buffer(&f, small, 7, "s.st", err, sizeof err) == -1 && strstr(err, "shorter than"));
    st_close(&f);
    CHECK(st_parse_buffer(&f, NULL, 0, "s.st", err, sizeof err) == -1 && strstr(err, "shorter than"));
    st_close(&f);

    // N == 0
    Buf b = make_raw("", 0, 0, 4);
    CHECK(st_parse_buffer(&f, b.buf, b.size, "z.st", err, sizeof err) == -1 && strstr(err, "header length is 0"));
    free(b.buf);
    // N > limit
    b = make_raw("{}", 2, (uint64_t)ST_MAX_HEADER_BYTES + 1, 0);
    CHECK(st_parse_buffer(&f, b.buf, b.size, "z.st", err, sizeof err) == -1 && strstr(err, "exceeds the limit"));
    free(b.buf);
    b = make_raw("{}", 2, UINT64_MAX, 0);
    CHECK(st_parse_buffer(&f, b.buf, b.size, "z.st", err, sizeof err) == -1 && strstr(err, "exceeds the limit"));
    free(b.buf);
    // N > size - 8
    b = make_raw("{}", 2, 3, 0);
    CHECK(st_parse_buffer(&f, b.buf, b.size, "z.st", err, sizeof err) == -1 && strstr(err, "exceeds the file size"));
    free(b.buf);
    // exactly 8 bytes with N = 1
    b = make_raw("", 0, 1, 0);
    CHECK(st_parse_buffer(&f, b.buf, b.size, "z.st", err, sizeof err) == -1 && strstr(err, "exceeds the file size"));
    free(b.buf);
    st_close(&f);
}

static void test_syntax(void) {
    EXPECT_ERR("hello", 0, "not a JSON object");
    EXPECT_ERR("[1,2]", 0, "not a JSON object");
    EXPECT_ERR(" {}", 0, "not a JSON object");
    EXPECT_ERR("{", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":", 0, "invalid JSON");
    EXPECT_ERR("{\"a\" 1}", 0, "expected ':'");
    EXPECT_ERR("{\"a\":1,}", 0, "invalid JSON");
    EXPECT_ERR("{,}", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":[1,]}", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":01}", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":1.}", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":1e}", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":-}", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":+1}", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":tru}", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":nul}", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":'x'}", 0, "invalid JSON");
    EXPECT_ERR("{a:1}", 0, "invalid JSON");
    EXPECT_ERR("{\"a\":\"x}", 0, "unterminated string");
    EXPECT_ERR("{\"a\":\"\\x\"}", 0, "invalid escape");
    EXPECT_ERR("{\"a\":\"\\u12\"}", 0, "\\u escape");
    EXPECT_ERR("{\"a\":\"\\u12G4\"}", 0, "bad hex digit");
    EXPECT_ERR("{\"a\":\"\\ud800\"}", 0, "surrogate");
    EXPECT_ERR("{\"a\":\"\\ud800\\u0041\"}", 0, "surrogate");
    EXPECT_ERR("{\"a\":\"\\udc00\"}", 0, "surrogate");
    EXPECT_ERR("{\"a\":\"tab\there\"}", 0, "control character");
    EXPECT_ERR("{}}", 0, "only space padding");
    EXPECT_ERR("{}\n", 0, "only space padding");
    EXPECT_ERR("{}  x", 0, "only space padding");
    EXPECT_ERR("{} \t", 0, "only space padding");

    // raw NUL byte inside the header
    {
        static const char h[] = "{\"a\0\":1}";
        Buf b = make_raw(h, sizeof h - 1, sizeof h - 1, 0);
        StFile f;
        char err[256];
        CHECK(st_parse_buffer(&f, b.buf, b.size, "n.st", err, sizeof err) == -1 && strstr(err, "control character"));
        free(b.buf);
    }

    // nesting depth: 64 levels fine for the syntax pass (then schema fails), 65+ rejected
    {
        char deep[400];
        size_t k = 0;
        k += (size_t)sprintf(deep + k, "{\"a\":");
        for (int i = 0; i < 70; i++) deep[k++] = '[';
        for (int i = 0; i < 70; i++) deep[k++] = ']';
        deep[k++] = '}';
        deep[k] = '\0';
        EXPECT_ERR(deep, 0, "nested deeper than 64");
        k = 0;
        k += (size_t)sprintf(deep + k, "{\"a\":");
        for (int i = 0; i < 63; i++) deep[k++] = '[';
        for (int i = 0; i < 63; i++) deep[k++] = ']';
        deep[k++] = '}';
        deep[k] = '\0';
        EXPECT_ERR(deep, 0, "description is not a JSON object");
    }
    // deep nesting far beyond the limit must not blow the stack
    {
        size_t n = 1000000;
        char *deep = malloc(n + 16);
        if (!deep) abort();
        memcpy(deep, "{\"a\":", 5);
        memset(deep + 5, '[', n);
        deep[n + 5] = '\0';
        EXPECT_ERR(deep, 0, "nested deeper");
        free(deep);
    }
}

static void test_utf8(void) {
    // overlong "/" (C0 AF), overlong NUL (C0 80), E0 80 80 overlong, surrogate ED A0 80,
    // > U+10FFFF (F4 90 80 80), F5 lead, lone continuation, truncated sequence.
    EXPECT_ERR("{\"\xC0\xAF\":1}", 0, "UTF-8");
    EXPECT_ERR("{\"\xC0\x80\":1}", 0, "UTF-8");
    EXPECT_ERR("{\"\xE0\x80\x80\":1}", 0, "UTF-8");
    EXPECT_ERR("{\"\xED\xA0\x80\":1}", 0, "UTF-8");
    EXPECT_ERR("{\"\xF4\x90\x80\x80\":1}", 0, "UTF-8");
    EXPECT_ERR("{\"\xF0\x80\x80\x80\":1}", 0, "UTF-8");
    EXPECT_ERR("{\"\xF5\x80\x80\x80\":1}", 0, "UTF-8");
    EXPECT_ERR("{\"\x80\":1}", 0, "UTF-8");
    EXPECT_ERR("{\"\xE2\x82\":1}", 0, "UTF-8");
    EXPECT_ERR("{\"a\":1}\xC3", 0, "UTF-8");
    EXPECT_ERR("{\"\xFF\":1}", 0, "UTF-8 at byte 2");
    // valid multi-byte: U+00E9, U+20AC, U+1F600, U+10FFFF
    EXPECT_OK("{\"\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\xF4\x8F\xBF\xBF\":"
              "{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
              1, 1);
}

static void test_schema(void) {
    // not an object per tensor / wrong types
    EXPECT_ERR("{\"x\":1}", 0, "tensor 'x': description is not a JSON object");
    EXPECT_ERR("{\"x\":{\"dtype\":1,\"shape\":[],\"data_offsets\":[0,4]}}", 4, "dtype is not a string");
    EXPECT_ERR("{\"x\":{\"dtype\":\"\",\"shape\":[],\"data_offsets\":[0,4]}}", 4, "dtype is empty");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F\\u000032\",\"shape\":[],\"data_offsets\":[0,4]}}", 4, "NUL");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":3,\"data_offsets\":[0,4]}}", 4, "shape is not an array");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":{}}}", 4, "data_offsets is not an array");
    // missing / unknown / duplicate keys
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "tensor 'x': missing key 'shape'");
    EXPECT_ERR("{\"x\":{\"shape\":[],\"data_offsets\":[0,4]}}", 4, "missing key 'dtype'");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[]}}", 4, "missing key 'data_offsets'");
    EXPECT_ERR("{\"x\":{}}", 4, "missing key");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4],\"foo\":1}}", 4,
               "tensor 'x': unknown key 'foo'");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4],\"dtype\":\"F32\"}}", 4,
               "duplicate key 'dtype'");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"shape\":[],\"data_offsets\":[0,4]}}", 4,
               "duplicate key 'shape'");
    // keys are compared after unescaping
    EXPECT_OK("{\"x\":{\"dtyp\\u0065\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}", 4, 1);
    // integers
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "non-negative integers");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[-0],\"data_offsets\":[0,0]}}", 4, "non-negative integers");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", 4, "non-negative integers");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[1e0],\"data_offsets\":[0,4]}}", 4, "non-negative integers");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4, "non-negative integers");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[null],\"data_offsets\":[0,4]}}", 4, "non-negative integers");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4.0]}}", 4, "non-negative integers");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[9223372036854775808],\"data_offsets\":[0,4]}}", 4,
               "shape value is too large");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,18446744073709551616]}}", 4,
               "data_offsets value is too large");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,99999999999999999999999]}}", 4,
               "data_offsets value is too large");
    EXPECT_ERR("{\"x\":{\"dtype\":\"U8\",\"shape\":[18446744073709551615],"
               "\"data_offsets\":[0,18446744073709551615]}}",
               4, "shape value is too large");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0]}}", 4, "exactly 2 entries");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[]}}", 4, "exactly 2 entries");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4,8]}}", 8, "exactly 2 entries");

    // ndim > ST_MAX_DIMS
    EXPECT_OK("{\"x\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, 1);
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
               "tensor 'x': shape has more than 8 dimensions");
    // numel / byte size overflow
    EXPECT_ERR("{\"x\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}", 4,
               "tensor 'x': number of elements of shape [4294967296, 4294967296] overflows");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,4]}}", 4,
               "byte size of shape [4611686018427387904] of F32 overflows");
    EXPECT_ERR("{\"x\":{\"dtype\":\"F64\",\"shape\":[3074457345618258603, 3],\"data_offsets\":[0,4]}}", 4,
               "overflows");
    // a zero dimension makes numel 0, but the others must still not overflow
    EXPECT_OK("{\"x\":{\"dtype\":\"F32\",\"shape\":[0,9223372036854775807],\"data_offsets\":[0,0]}}", 0, 1);
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[0,4294967296,4294967296],\"data_offsets\":[0,0]}}", 0,
               "overflows");

    // size mismatch: exact message
    {
        const char *json = "{\"x.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,12]}}";
        Buf b = make(json, 24);
        StFile f;
        char err[512];
        CHECK(st_parse_buffer(&f, b.buf, b.size, "model.safetensors", err, sizeof err) == -1);
        CHECK(strcmp(err, "model.safetensors: tensor 'x.weight': data_offsets [0, 12] hold 12 bytes but shape [2, 3] "
                          "of F32 needs 24") == 0);
        if (strstr(err, "needs 24") == NULL) fprintf(stderr, "  got: %s\n", err);
        free(b.buf);
    }
    EXPECT_ERR("{\"x\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[0,4]}}", 4,
               "tensor 'x': data_offsets [0, 4] hold 4 bytes but shape [] of BF16 needs 2");
    // begin > end
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[8,4]}}", 8,
               "tensor 'x': data_offsets [8, 4] have begin > end");
    EXPECT_ERR("{\"x\":{\"dtype\":\"Q4\",\"shape\":[],\"data_offsets\":[8,4]}}", 8, "begin > end");
    // end > data section
    EXPECT_ERR("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 7,
               "tensor 'x': data_offsets [0, 8] extend past the end of the data section (7 bytes)");
    EXPECT_ERR("{\"x\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,18446744073709551615]}}", 7,
               "past the end of the data section");
    EXPECT_ERR("{\"x\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[9,9]}}", 8, "past the end");
    EXPECT_OK("{\"x\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[8,8]}}", 8, 1);
    // unknown dtype kept as ST_OTHER
    {
        const char *json = "{\"q\":{\"dtype\":\"Q4_K_VERY_LONG_DTYPE_NAME\",\"shape\":[32],\"data_offsets\":[2,20]},"
                           "\"e\":{\"dtype\":\"\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\","
                           "\"shape\":[],\"data_offsets\":[0,0]}}";
        Buf b = make(json, 20);
        StFile f;
        char err[256];
        CHECK(st_parse_buffer(&f, b.buf, b.size, "o.st", err, sizeof err) == 0);
        const StTensor *q = st_find(&f, "q");
        const StTensor *e = st_find(&f, "e");
        CHECK(q && q->dtype == ST_OTHER && strcmp(q->dtype_name, "Q4_K_VERY_LONG_") == 0);
        CHECK(q && q->numel == 32 && q->begin == 2 && q->end == 20);
        // 16-byte name truncated to 15 bytes on a character boundary (7 x U+00E9)
        CHECK(e && e->dtype == ST_OTHER && strlen(e->dtype_name) == 14);
        st_close(&f);
        free(b.buf);
    }

    // duplicate names (also via escapes)
    EXPECT_ERR("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
               "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
               2, "duplicate tensor name 'a'");
    EXPECT_ERR("{\"ab\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
               "\"a\\u0062\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
               2, "duplicate tensor name 'ab'");
    EXPECT_ERR("{\"__metadata__\":{},\"__metadata__\":{}}", 0, "duplicate __metadata__");

    // overlaps
    EXPECT_ERR("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[3,7]}}",
               8, "tensors 'a' [0, 4] and 'b' [3, 7] have overlapping data_offsets");
    EXPECT_ERR("{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[6,7]},"
               "\"c\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]}}",
               8, "overlapping");
    EXPECT_ERR("{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]}}",
               8, "overlapping");
    // contained range after a long one (max end must be tracked)
    EXPECT_ERR("{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]},"
               "\"c\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[4,5]}}",
               8, "overlapping");
    // adjacency, gaps and zero-length tensors inside other ranges are fine
    EXPECT_OK("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
              "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]},"
              "\"c\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[10,12]},"
              "\"z\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[2,2]},"
              "\"z2\":{\"dtype\":\"F32\",\"shape\":[3,0],\"data_offsets\":[2,2]}}",
              16, 5);

    // names
    EXPECT_ERR("{\"\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "empty tensor name");
    EXPECT_ERR("{\"a\\u0000b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
               "tensor 'a\\x00b': name contains a NUL");
    {
        char json[4096];
        char name[1100];
        memset(name, 'n', 1024);
        name[1024] = '\0';
        snprintf(json, sizeof json, "{\"%s\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", name);
        EXPECT_OK(json, 1, 1);
        name[1024] = 'n';
        name[1025] = '\0';
        snprintf(json, sizeof json, "{\"%s\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", name);
        EXPECT_ERR(json, 1, "longer than 1024 bytes");
    }
    // hostile names are escaped and cut in messages
    EXPECT_ERR("{\"a\\n'b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,2]}}", 2,
               "tensor 'a\\x0a\\x27b': data_offsets");

    // empty header object
    EXPECT_OK("{}", 0, 0);
    EXPECT_OK("{ }", 5, 0);
}

static void test_metadata_padding_unicode(void) {
    EXPECT_OK("{\"__metadata__\":{\"format\":\"pt\",\"k\\u00e9\":\"v\\n\"},"
              "\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
              4, 1);
    EXPECT_OK("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"__metadata__\":{}}", 4, 1);
    EXPECT_ERR("{\"__metadata__\":[]}", 0, "__metadata__ is not a JSON object");
    EXPECT_ERR("{\"__metadata__\":\"x\"}", 0, "__metadata__ is not a JSON object");
    EXPECT_ERR("{\"__metadata__\":{\"a\":1}}", 0, "__metadata__ entry 'a' is not a string");
    EXPECT_ERR("{\"__metadata__\":{\"a\":\"b\",\"c\":{}}}", 0, "__metadata__ entry 'c' is not a string");
    EXPECT_ERR("{\"__metadata__\":{\"a\":null}}", 0, "not a string");
    // the entries are kept, decoded, in header order (NUL included)
    {
        Buf b = make("{\"__metadata__\":{\"format\":\"pt\",\"k\\u00e9\":\"v\\n\\u0000w\",\"e\":\"\"}}", 0);
        StFile f;
        char err[256];
        CHECK(st_parse_buffer(&f, b.buf, b.size, "t.safetensors", err, sizeof err) == 0);
        CHECK(f.n_meta == 3);
        if (f.n_meta == 3) {
            CHECK(strcmp(f.meta[0].key, "format") == 0 && strcmp(f.meta[0].value, "pt") == 0);
            CHECK(f.meta[1].key_len == 3 && memcmp(f.meta[1].key, "k\xC3\xA9", 3) == 0);
            CHECK(f.meta[1].value_len == 4 && memcmp(f.meta[1].value, "v\n\0w", 4) == 0);
            CHECK(f.meta[2].value_len == 0 && f.meta[2].value[0] == '\0');
        }
        st_close(&f);
        CHECK(f.meta == NULL && f.n_meta == 0);
        free(b.buf);
    }

    // trailing space padding (as writers align the data section to 8 bytes)
    EXPECT_OK("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}       ", 4, 1);
    EXPECT_OK("{}      ", 0, 0);
    // whitespace inside the JSON is fine
    EXPECT_OK("{ \"x\" :\n{\t\"dtype\" : \"F32\" ,\r\n \"shape\" : [ 1 ] , \"data_offsets\" : [ 0 , 4 ] } }  ", 4, 1);

    // unicode escapes in names, including a surrogate pair, and raw UTF-8
    {
        const char *json = "{\"caf\\u00e9.\\ud83d\\ude00\\u20AC\\/\\\"\\\\\\b\\f\\n\\r\\t\":"
                           "{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                           "\"\xE2\x82\xAC\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}";
        Buf b = make(json, 2);
        StFile f;
        char err[256];
        CHECK(st_parse_buffer(&f, b.buf, b.size, "u.st", err, sizeof err) == 0);
        const StTensor *t = st_find(&f, "caf\xC3\xA9.\xF0\x9F\x98\x80\xE2\x82\xAC/\"\\\b\f\n\r\t");
        CHECK(t != NULL && t->begin == 0);
        const StTensor *e = st_find(&f, "\xE2\x82\xAC");
        CHECK(e != NULL && e->begin == 1);
        st_close(&f);
        free(b.buf);
    }
}

static void test_err_buffer(void) {
    const char *json = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,12]}}";
    Buf b = make(json, 24);
    StFile f;
    char err[16];
    memset(err, 'X', sizeof err);
    CHECK(st_parse_buffer(&f, b.buf, b.size, "a-very-long-label.safetensors", err, 10) == -1);
    CHECK(strlen(err) == 9 && err[10] == 'X');
    memset(err, 'X', sizeof err);
    CHECK(st_parse_buffer(&f, b.buf, b.size, "lbl", err, 1) == -1);
    CHECK(err[0] == '\0' && err[1] == 'X');
    CHECK(st_parse_buffer(&f, b.buf, b.size, "lbl", NULL, 0) == -1);
    char big[512];
    CHECK(st_parse_buffer(&f, b.buf, b.size, NULL, big, sizeof big) == -1);
    CHECK(strncmp(big, "<buffer>: ", 10) == 0);
    st_close(&f);
    free(b.buf);

    StFile z;
    memset(&z, 0, sizeof z);
    st_close(&z);  // zeroed struct
    st_close(&z);
    st_close(NULL);
    CHECK(z.fd == -1);
}

static int write_file(const char *path, const void *p, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return -1;
    size_t w = n ? fwrite(p, 1, n, fp) : 0;
    return (fclose(fp) == 0 && w == n) ? 0 : -1;
}

static void test_open(void) {
    char dir[] = "/tmp/st_test_XXXXXX";
    if (!mkdtemp(dir)) {
        g_fail++;
        fprintf(stderr, "FAIL: mkdtemp\n");
        return;
    }
    char path[256];
    StFile f;
    char err[512];

    const char *json = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"b\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[8,11]}}";
    Buf b = make(json, 11);
    snprintf(path, sizeof path, "%s/ok.safetensors", dir);
    CHECK(write_file(path, b.buf, b.size) == 0);
    int rc = st_open(&f, path, err, sizeof err);
    CHECK(rc == 0);
    if (rc == 0) {
        CHECK(f.fd == -1 && f.map != NULL && f.map_size == b.size && strcmp(f.path, path) == 0);
        CHECK(f.n_tensors == 2 && strcmp(f.tensors[0].name, "b") == 0);
        const StTensor *w = st_find(&f, "w");
        CHECK(w && w->data == (const unsigned char *)f.map + 8 + strlen(json));
        CHECK(w && memcmp(w->data, b.buf + 8 + strlen(json), 8) == 0);
        const StTensor *bb = st_find(&f, "b");
        CHECK(bb && memcmp(bb->data, b.buf + 8 + strlen(json) + 8, 3) == 0);
    } else {
        fprintf(stderr, "  err: %s\n", err);
    }
    st_close(&f);
    st_close(&f);
    CHECK(f.map == NULL && f.path == NULL);
    unlink(path);

    // bad header from disk: message names the path
    Buf bad = make("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 8);
    snprintf(path, sizeof path, "%s/bad.safetensors", dir);
    CHECK(write_file(path, bad.buf, bad.size) == 0);
    CHECK(st_open(&f, path, err, sizeof err) == -1 && strstr(err, path) && strstr(err, "tensor 'w'"));
    CHECK(f.map == NULL && f.tensors == NULL && f.path == NULL);
    st_close(&f);
    unlink(path);
    free(bad.buf);

    // empty file
    snprintf(path, sizeof path, "%s/empty.safetensors", dir);
    CHECK(write_file(path, "", 0) == 0);
    CHECK(st_open(&f, path, err, sizeof err) == -1 && strstr(err, "shorter than"));
    st_close(&f);
    unlink(path);
    // 5-byte file
    snprintf(path, sizeof path, "%s/short.safetensors", dir);
    CHECK(write_file(path, "abcde", 5) == 0);
    CHECK(st_open(&f, path, err, sizeof err) == -1 && strstr(err, "shorter than"));
    st_close(&f);
    unlink(path);
    // missing file and directory
    snprintf(path, sizeof path, "%s/missing.safetensors", dir);
    CHECK(st_open(&f, path, err, sizeof err) == -1 && strstr(err, "cannot open") && strstr(err, "missing"));
    st_close(&f);
    CHECK(st_open(&f, dir, err, sizeof err) == -1 && strstr(err, "not a regular file"));
    st_close(&f);
    CHECK(st_open(&f, NULL, err, sizeof err) == -1);
    st_close(&f);
    rmdir(dir);
    free(b.buf);
}

int main(void) {
    test_valid();
    test_dtype_sizes();
    test_length_prefix();
    test_syntax();
    test_utf8();
    test_schema();
    test_metadata_padding_unicode();
    test_err_buffer();
    test_open();
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail != 0;
}
