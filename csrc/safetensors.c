// safetensors.c: memory-map one .safetensors file and validate its header.
//
// Parsing runs in two passes over the header bytes, after a UTF-8 check:
//   1. a generic, depth-bounded strict JSON syntax check (nothing allocated);
//   2. a schema walk that fills the tensor table.
// Both passes use the same bounds-checked primitives, so the second one never
// relies on the first for memory safety, only for nicer error messages.
// Memory use is O(number of tensors); recursion depth is bounded.
#define _POSIX_C_SOURCE 200809L

#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_DEPTH 64
#define ST_MAX_NAME_BYTES 1024
#define ST_SHOWN_NAME 160  // bytes of a name echoed in an error message

#if defined(__GNUC__)
#define ST_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define ST_PRINTF(a, b)
#endif

// ---------------------------------------------------------------------------
// dtypes

static const struct {
    const char *name;
    StDType dt;
    size_t size;
} k_dtypes[] = {
    {"F32", ST_F32, 4},         {"BF16", ST_BF16, 2},       {"F16", ST_F16, 2},
    {"F64", ST_F64, 8},         {"I64", ST_I64, 8},         {"I32", ST_I32, 4},
    {"I16", ST_I16, 2},         {"I8", ST_I8, 1},           {"U8", ST_U8, 1},
    {"BOOL", ST_BOOL, 1},       {"F8_E4M3", ST_F8_E4M3, 1}, {"F8_E5M2", ST_F8_E5M2, 1},
    {"U16", ST_U16, 2},         {"U32", ST_U32, 4},         {"U64", ST_U64, 8},
};
#define ST_N_KNOWN_DTYPES (sizeof k_dtypes / sizeof k_dtypes[0])

size_t st_dtype_size(StDType dt) {
    for (size_t i = 0; i < ST_N_KNOWN_DTYPES; i++)
        if (k_dtypes[i].dt == dt) return k_dtypes[i].size;
    return 0;
}

// ---------------------------------------------------------------------------
// error reporting

typedef struct {
    const unsigned char *s;  // header bytes (not NUL-terminated)
    size_t n;                // header length
    size_t pos;              // cursor
    const char *label;
    char *err;
    size_t errlen;
} Parser;

static void write_err(char *err, size_t errlen, const char *label, const char *fmt, va_list ap) {
    if (!err || errlen == 0) return;
    int k = snprintf(err, errlen, "%s: ", label);
    if (k < 0) {
        err[0] = '\0';
        return;
    }
    if ((size_t)k >= errlen - 1) return;  // already truncated (and terminated)
    vsnprintf(err + k, errlen - (size_t)k, fmt, ap);
}

ST_PRINTF(4, 5)
static int fail_ctx(char *err, size_t errlen, const char *label, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    write_err(err, errlen, label, fmt, ap);
    va_end(ap);
    return -1;
}

ST_PRINTF(2, 3)
static int fail(Parser *P, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    write_err(P->err, P->errlen, P->label, fmt, ap);
    va_end(ap);
    return -1;
}

// Copy a (possibly hostile) name into `out` for display: control bytes, quote
// and backslash are escaped, long names are cut (on a UTF-8 boundary) with "...".
static const char *show(char *out, size_t cap, const char *s, size_t len) {
    static const char hex[] = "0123456789abcdef";
    size_t o = 0, i = 0;
    if (!out || cap == 0) return "";
    if (cap < 8) {
        out[0] = '\0';
        return out;
    }
    while (i < len) {
        unsigned char c = (unsigned char)s[i];
        size_t clen = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        if (clen > len - i) clen = len - i;
        int esc = c < 0x20 || c == 0x7f || c == '\\' || c == '\'';
        size_t olen = esc ? 4 : clen;
        // whole characters only; keep room for "..." and the NUL
        if (i + clen > ST_SHOWN_NAME || o + olen + 4 > cap) break;
        if (esc) {
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        } else {
            memcpy(out + o, s + i, clen);
            o += clen;
        }
        i += clen;
    }
    if (i < len) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
    return out;
}

// ---------------------------------------------------------------------------
// UTF-8 validation (RFC 3629: no overlongs, no surrogates, max U+10FFFF)

static size_t utf8_invalid_at(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            return i;
        }
        if (n - i - 1 < need) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xC0) != 0x80) return i;
        i += need + 1;
    }
    return n;
}

// ---------------------------------------------------------------------------
// JSON primitives

static int at_end(const Parser *P) { return P->pos >= P->n; }
static int peek(const Parser *P) { return P->pos < P->n ? P->s[P->pos] : -1; }

static void skip_ws(Parser *P) {
    while (P->pos < P->n) {
        unsigned char c = P->s[P->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        P->pos++;
    }
}

static int syntax(Parser *P, const char *what) {
    if (at_end(P)) return fail(P, "invalid JSON header: %s, got end of header", what);
    return fail(P, "invalid JSON header at byte %zu: %s", P->pos, what);
}

static int expect_char(Parser *P, char c, const char *what) {
    skip_ws(P);
    if (peek(P) != (unsigned char)c) return syntax(P, what);
    P->pos++;
    return 0;
}

static int hex4(Parser *P, unsigned *out) {
    if (P->n - P->pos < 4) return syntax(P, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = P->s[P->pos + (size_t)i];
        unsigned d;
        if (c >= '0' && c <= '9') d = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') d = (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') d = (unsigned)(c - 'A' + 10);
        else return syntax(P, "bad hex digit in \\u escape");
        v = (v << 4) | d;
    }
    P->pos += 4;
    *out = v;
    return 0;
}

typedef struct {
    char *buf;       // may be NULL (validate only)
    size_t cap;      // bytes available in buf
    size_t len;      // full decoded length (may exceed cap)
    int has_nul;     // decoded value contains U+0000
} StrOut;

static void put_byte(StrOut *o, unsigned char b) {
    if (o->buf && o->len < o->cap) o->buf[o->len] = (char)b;
    o->len++;
}

static void put_cp(StrOut *o, unsigned cp) {
    if (cp == 0) o->has_nul = 1;
    if (cp < 0x80) {
        put_byte(o, (unsigned char)cp);
    } else if (cp < 0x800) {
        put_byte(o, (unsigned char)(0xC0 | (cp >> 6)));
        put_byte(o, (unsigned char)(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        put_byte(o, (unsigned char)(0xE0 | (cp >> 12)));
        put_byte(o, (unsigned char)(0x80 | ((cp >> 6) & 0x3F)));
        put_byte(o, (unsigned char)(0x80 | (cp & 0x3F)));
    } else {
        put_byte(o, (unsigned char)(0xF0 | (cp >> 18)));
        put_byte(o, (unsigned char)(0x80 | ((cp >> 12) & 0x3F)));
        put_byte(o, (unsigned char)(0x80 | ((cp >> 6) & 0x3F)));
        put_byte(o, (unsigned char)(0x80 | (cp & 0x3F)));
    }
}

// Parse a string at the cursor (which must be on '"'); decode into o.
// Raw bytes were already checked to be valid UTF-8.
static int parse_string(Parser *P, StrOut *o) {
    o->len = 0;
    o->has_nul = 0;
    if (peek(P) != '"') return syntax(P, "expected a string");
    P->pos++;
    for (;;) {
        if (at_end(P)) return syntax(P, "unterminated string");
        unsigned char c = P->s[P->pos];
        if (c == '"') {
            P->pos++;
            return 0;
        }
        if (c < 0x20) return syntax(P, "control character in string");
        if (c != '\\') {
            put_byte(o, c);
            P->pos++;
            continue;
        }
        P->pos++;
        if (at_end(P)) return syntax(P, "unterminated escape");
        unsigned char e = P->s[P->pos++];
        switch (e) {
        case '"': put_byte(o, '"'); break;
        case '\\': put_byte(o, '\\'); break;
        case '/': put_byte(o, '/'); break;
        case 'b': put_byte(o, '\b'); break;
        case 'f': put_byte(o, '\f'); break;
        case 'n': put_byte(o, '\n'); break;
        case 'r': put_byte(o, '\r'); break;
        case 't': put_byte(o, '\t'); break;
        case 'u': {
            unsigned cp;
            if (hex4(P, &cp)) return -1;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return syntax(P, "unpaired low surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (P->n - P->pos < 2 || P->s[P->pos] != '\\' || P->s[P->pos + 1] != 'u')
                    return syntax(P, "unpaired high surrogate in \\u escape");
                P->pos += 2;
                if (hex4(P, &lo)) return -1;
                if (lo < 0xDC00 || lo > 0xDFFF) return syntax(P, "high surrogate not followed by a low surrogate");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            put_cp(o, cp);
            break;
        }
        default:
            P->pos--;
            return syntax(P, "invalid escape in string");
        }
    }
}

typedef struct {
    int plain_uint;   // no sign, fraction or exponent
    int overflow;     // plain_uint but > UINT64_MAX
    uint64_t value;   // valid when plain_uint && !overflow
} NumInfo;

static int is_digit(int c) { return c >= '0' && c <= '9'; }

static int parse_number(Parser *P, NumInfo *ni) {
    ni->plain_uint = 1;
    ni->overflow = 0;
    ni->value = 0;
    if (peek(P) == '-') {
        ni->plain_uint = 0;
        P->pos++;
    }
    int c = peek(P);
    if (c == '0') {
        P->pos++;
    } else if (c >= '1' && c <= '9') {
        while (is_digit(peek(P))) {
            unsigned d = (unsigned)(P->s[P->pos] - '0');
            if (ni->value > (UINT64_MAX - d) / 10) ni->overflow = 1;
            else ni->value = ni->value * 10 + d;
            P->pos++;
        }
    } else {
        return syntax(P, "invalid number");
    }
    if (peek(P) == '.') {
        ni->plain_uint = 0;
        P->pos++;
        if (!is_digit(peek(P))) return syntax(P, "expected a digit after '.'");
        while (is_digit(peek(P))) P->pos++;
    }
    if (peek(P) == 'e' || peek(P) == 'E') {
        ni->plain_uint = 0;
        P->pos++;
        if (peek(P) == '+' || peek(P) == '-') P->pos++;
        if (!is_digit(peek(P))) return syntax(P, "expected a digit in exponent");
        while (is_digit(peek(P))) P->pos++;
    }
    if (!ni->plain_uint) ni->overflow = 0;
    return 0;
}

static int parse_literal(Parser *P, const char *lit) {
    size_t k = strlen(lit);
    if (P->n - P->pos < k || memcmp(P->s + P->pos, lit, k) != 0) return syntax(P, "invalid literal");
    P->pos += k;
    return 0;
}

// Validate any JSON value at the cursor (leading whitespace already skipped).
static int skip_value(Parser *P, int depth) {
    if (depth > ST_MAX_DEPTH) return fail(P, "JSON header nested deeper than %d levels", ST_MAX_DEPTH);
    StrOut none = {NULL, 0, 0, 0};
    NumInfo ni;
    switch (peek(P)) {
    case '{':
        P->pos++;
        skip_ws(P);
        if (peek(P) == '}') {
            P->pos++;
            return 0;
        }
        for (;;) {
            skip_ws(P);
            if (parse_string(P, &none)) return -1;
            if (expect_char(P, ':', "expected ':' after object key")) return -1;
            skip_ws(P);
            if (skip_value(P, depth + 1)) return -1;
            skip_ws(P);
            int c = peek(P);
            if (c == ',') {
                P->pos++;
                continue;
            }
            if (c == '}') {
                P->pos++;
                return 0;
            }
            return syntax(P, "expected ',' or '}' in object");
        }
    case '[':
        P->pos++;
        skip_ws(P);
        if (peek(P) == ']') {
            P->pos++;
            return 0;
        }
        for (;;) {
            skip_ws(P);
            if (skip_value(P, depth + 1)) return -1;
            skip_ws(P);
            int c = peek(P);
            if (c == ',') {
                P->pos++;
                continue;
            }
            if (c == ']') {
                P->pos++;
                return 0;
            }
            return syntax(P, "expected ',' or ']' in array");
        }
    case '"':
        return parse_string(P, &none);
    case 't':
        return parse_literal(P, "true");
    case 'f':
        return parse_literal(P, "false");
    case 'n':
        return parse_literal(P, "null");
    default:
        if (peek(P) == '-' || is_digit(peek(P))) return parse_number(P, &ni);
        return syntax(P, "expected a JSON value");
    }
}

// ---------------------------------------------------------------------------
// schema walk

static int str_is(const StrOut *o, const char *lit) {
    size_t k = strlen(lit);
    return o->len == k && o->len <= o->cap && memcmp(o->buf, lit, k) == 0;
}

void st_fmt_shape(char *out, size_t cap, int ndim, const int64_t *shape) {
    if (!out || cap == 0) return;
    size_t o = 0;
    int k = snprintf(out, cap, "[");
    if (k < 0 || (size_t)k >= cap) return;
    o = (size_t)k;
    for (int i = 0; i < ndim; i++) {
        k = snprintf(out + o, cap - o, "%s%" PRId64, i ? ", " : "", shape[i]);
        if (k < 0 || (size_t)k >= cap - o) return;
        o += (size_t)k;
    }
    snprintf(out + o, cap - o, "]");
}

// Decodes the string at the cursor into a new NUL-terminated buffer (*out, *len bytes).
static int parse_string_alloc(Parser *P, char **out, size_t *len) {
    const size_t start = P->pos;
    StrOut probe = {NULL, 0, 0, 0};
    if (parse_string(P, &probe)) return -1;
    char *buf = malloc(probe.len + 1);
    if (!buf) return fail(P, "out of memory");
    StrOut o = {buf, probe.len, 0, 0};
    P->pos = start;
    parse_string(P, &o);  // the same bytes again: cannot fail
    buf[probe.len] = '\0';
    *out = buf;
    *len = probe.len;
    return 0;
}

static void free_meta(StMeta *m, int n) {
    if (!m) return;
    for (int i = 0; i < n; i++) {
        free(m[i].key);
        free(m[i].value);
    }
    free(m);
}

// The __metadata__ object: string keys to string values, kept in *out (header order).
static int parse_metadata(Parser *P, StMeta **out, int *n_out) {
    char shown[ST_SHOWN_NAME * 4 + 8];
    StMeta *m = NULL;
    int n = 0, cap = 0;
    skip_ws(P);
    if (peek(P) != '{') return fail(P, "__metadata__ is not a JSON object");
    P->pos++;
    skip_ws(P);
    if (peek(P) == '}') {
        P->pos++;
        return 0;
    }
    for (;;) {
        if (n == cap) {
            if (cap > INT_MAX / 2 || (size_t)(cap ? cap * 2 : 8) > SIZE_MAX / sizeof *m) {
                fail(P, "too many __metadata__ entries");
                goto fail;
            }
            int ncap = cap ? cap * 2 : 8;
            StMeta *nm = realloc(m, (size_t)ncap * sizeof *m);
            if (!nm) {
                fail(P, "out of memory");
                goto fail;
            }
            m = nm;
            cap = ncap;
        }
        StMeta *e = &m[n];
        memset(e, 0, sizeof *e);
        skip_ws(P);
        if (parse_string_alloc(P, &e->key, &e->key_len)) goto fail;
        n++;  // owned from here: freed with the others
        if (expect_char(P, ':', "expected ':' after object key")) goto fail;
        skip_ws(P);
        if (peek(P) != '"') {
            fail(P, "__metadata__ entry '%s' is not a string", show(shown, sizeof shown, e->key, e->key_len));
            goto fail;
        }
        if (parse_string_alloc(P, &e->value, &e->value_len)) goto fail;
        skip_ws(P);
        int c = peek(P);
        if (c == ',') {
            P->pos++;
            continue;
        }
        if (c == '}') {
            P->pos++;
            *out = m;
            *n_out = n;
            return 0;
        }
        syntax(P, "expected ',' or '}' in object");
        goto fail;
    }
fail:
    free_meta(m, n);
    return -1;
}

// Parse one non-negative integer array element; `what` names the field.
static int parse_uint_elem(Parser *P, const char *tname, const char *what, uint64_t max, uint64_t *out) {
    NumInfo ni;
    if (peek(P) != '-' && !is_digit(peek(P)))
        return fail(P, "tensor '%s': %s must contain only non-negative integers", tname, what);
    if (parse_number(P, &ni)) return -1;
    if (!ni.plain_uint)
        return fail(P, "tensor '%s': %s must contain only non-negative integers", tname, what);
    if (ni.overflow || ni.value > max)
        return fail(P, "tensor '%s': %s value is too large", tname, what);
    *out = ni.value;
    return 0;
}

// Parse the tensor description object at the cursor into t (name already set).
static int parse_tensor(Parser *P, StTensor *t, const char *tname, uint64_t data_size) {
    char kbuf[32], dbuf[64];
    StrOut key = {kbuf, sizeof kbuf, 0, 0};
    StrOut dts = {dbuf, sizeof dbuf, 0, 0};
    int seen_dtype = 0, seen_shape = 0, seen_offsets = 0;
    char shown[ST_SHOWN_NAME * 4 + 8];

    skip_ws(P);
    if (peek(P) != '{') return fail(P, "tensor '%s': description is not a JSON object", tname);
    P->pos++;
    skip_ws(P);
    if (peek(P) == '}') {
        P->pos++;
    } else {
        for (;;) {
            skip_ws(P);
            if (parse_string(P, &key)) return -1;
            if (expect_char(P, ':', "expected ':' after object key")) return -1;
            skip_ws(P);
            if (str_is(&key, "dtype")) {
                if (seen_dtype) return fail(P, "tensor '%s': duplicate key 'dtype'", tname);
                seen_dtype = 1;
                if (peek(P) != '"') return fail(P, "tensor '%s': dtype is not a string", tname);
                if (parse_string(P, &dts)) return -1;
                if (dts.len == 0) return fail(P, "tensor '%s': dtype is empty", tname);
                if (dts.has_nul) return fail(P, "tensor '%s': dtype contains a NUL character", tname);
                t->dtype = ST_OTHER;
                for (size_t i = 0; i < ST_N_KNOWN_DTYPES; i++) {
                    if (str_is(&dts, k_dtypes[i].name)) {
                        t->dtype = k_dtypes[i].dt;
                        break;
                    }
                }
                // keep the name (truncated on a UTF-8 boundary) for messages
                size_t keep = dts.len < dts.cap ? dts.len : dts.cap;
                if (keep > sizeof t->dtype_name - 1) {
                    keep = sizeof t->dtype_name - 1;
                    // drop a partial trailing character
                    size_t j = keep;
                    while (j > 0 && ((unsigned char)dbuf[j - 1] & 0xC0) == 0x80) j--;
                    if (j > 0 && (unsigned char)dbuf[j - 1] >= 0xC0) {
                        unsigned char lead = (unsigned char)dbuf[j - 1];
                        size_t clen = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
                        if (j - 1 + clen > keep) keep = j - 1;
                    }
                }
                memcpy(t->dtype_name, dbuf, keep);
                t->dtype_name[keep] = '\0';
            } else if (str_is(&key, "shape")) {
                if (seen_shape) return fail(P, "tensor '%s': duplicate key 'shape'", tname);
                seen_shape = 1;
                if (peek(P) != '[') return fail(P, "tensor '%s': shape is not an array", tname);
                P->pos++;
                skip_ws(P);
                if (peek(P) == ']') {
                    P->pos++;
                } else {
                    for (;;) {
                        uint64_t v;
                        skip_ws(P);
                        if (t->ndim >= ST_MAX_DIMS)
                            return fail(P, "tensor '%s': shape has more than %d dimensions (ndim > ST_MAX_DIMS)", tname,
                                        ST_MAX_DIMS);
                        if (parse_uint_elem(P, tname, "shape", (uint64_t)INT64_MAX, &v)) return -1;
                        t->shape[t->ndim++] = (int64_t)v;
                        skip_ws(P);
                        int c = peek(P);
                        if (c == ',') {
                            P->pos++;
                            continue;
                        }
                        if (c == ']') {
                            P->pos++;
                            break;
                        }
                        return syntax(P, "expected ',' or ']' in array");
                    }
                }
            } else if (str_is(&key, "data_offsets")) {
                if (seen_offsets) return fail(P, "tensor '%s': duplicate key 'data_offsets'", tname);
                seen_offsets = 1;
                if (peek(P) != '[') return fail(P, "tensor '%s': data_offsets is not an array", tname);
                P->pos++;
                uint64_t v[2] = {0, 0};
                int count = 0;
                skip_ws(P);
                if (peek(P) == ']') {
                    P->pos++;
                } else {
                    for (;;) {
                        uint64_t x;
                        skip_ws(P);
                        if (count >= 2)
                            return fail(P, "tensor '%s': data_offsets must have exactly 2 entries", tname);
                        if (parse_uint_elem(P, tname, "data_offsets", UINT64_MAX, &x)) return -1;
                        v[count++] = x;
                        skip_ws(P);
                        int c = peek(P);
                        if (c == ',') {
                            P->pos++;
                            continue;
                        }
                        if (c == ']') {
                            P->pos++;
                            break;
                        }
                        return syntax(P, "expected ',' or ']' in array");
                    }
                }
                if (count != 2) return fail(P, "tensor '%s': data_offsets must have exactly 2 entries", tname);
                t->begin = v[0];
                t->end = v[1];
            } else {
                size_t kl = key.len < key.cap ? key.len : key.cap;
                show(shown, sizeof shown, kbuf, kl);
                return fail(P, "tensor '%s': unknown key '%s%s'", tname, shown, key.len > key.cap ? "..." : "");
            }
            skip_ws(P);
            int c = peek(P);
            if (c == ',') {
                P->pos++;
                continue;
            }
            if (c == '}') {
                P->pos++;
                break;
            }
            return syntax(P, "expected ',' or '}' in object");
        }
    }
    if (!seen_dtype) return fail(P, "tensor '%s': missing key 'dtype'", tname);
    if (!seen_shape) return fail(P, "tensor '%s': missing key 'shape'", tname);
    if (!seen_offsets) return fail(P, "tensor '%s': missing key 'data_offsets'", tname);

    // numel: a zero dimension makes it 0, but the other dimensions must still
    // multiply without overflow so that stride arithmetic downstream is safe.
    uint64_t prod = 1;
    int zero = 0;
    for (int i = 0; i < t->ndim; i++) {
        uint64_t d = (uint64_t)t->shape[i];
        if (d == 0) {
            zero = 1;
            continue;
        }
        if (prod > (uint64_t)INT64_MAX / d) {
            char sh[256];
            st_fmt_shape(sh, sizeof sh, t->ndim, t->shape);
            return fail(P, "tensor '%s': number of elements of shape %s overflows", tname, sh);
        }
        prod *= d;
    }
    t->numel = zero ? 0 : prod;

    if (t->begin > t->end)
        return fail(P, "tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] have begin > end", tname, t->begin,
                    t->end);
    size_t isz = st_dtype_size(t->dtype);
    if (isz) {
        char sh[256];
        if (t->numel > UINT64_MAX / isz) {
            st_fmt_shape(sh, sizeof sh, t->ndim, t->shape);
            return fail(P, "tensor '%s': byte size of shape %s of %s overflows", tname, sh, t->dtype_name);
        }
        uint64_t need = t->numel * isz;
        uint64_t have = t->end - t->begin;
        if (have != need) {
            st_fmt_shape(sh, sizeof sh, t->ndim, t->shape);
            return fail(P,
                        "tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] hold %" PRIu64
                        " bytes but shape %s of %s needs %" PRIu64,
                        tname, t->begin, t->end, have, sh, t->dtype_name, need);
        }
    }
    if (t->end > data_size)
        return fail(P,
                    "tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                    "] extend past the end of the data section (%" PRIu64 " bytes)",
                    tname, t->begin, t->end, data_size);
    return 0;
}

static void free_tensors(StTensor *ts, int n) {
    if (!ts) return;
    for (int i = 0; i < n; i++) free(ts[i].name);
    free(ts);
}

static int cmp_name(const void *a, const void *b) {
    return strcmp(((const StTensor *)a)->name, ((const StTensor *)b)->name);
}

static int cmp_begin(const void *a, const void *b) {
    const StTensor *x = *(const StTensor *const *)a, *y = *(const StTensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

// Core: validate `size` bytes at `base` as a whole safetensors file and fill
// f->tensors / n_tensors / header_len. On failure nothing is left allocated.
static int parse_file(StFile *f, const unsigned char *base, size_t size, const char *label, char *err,
                      size_t errlen) {
    if (size < 8) return fail_ctx(err, errlen, label, "file is %zu bytes, shorter than the 8-byte header length", size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | base[i];
    if (n == 0) return fail_ctx(err, errlen, label, "header length is 0");
    if (n > ST_MAX_HEADER_BYTES)
        return fail_ctx(err, errlen, label, "header length %" PRIu64 " exceeds the limit of %u bytes", n,
                        (unsigned)ST_MAX_HEADER_BYTES);
    if (n > (uint64_t)(size - 8))
        return fail_ctx(err, errlen, label,
                        "header length %" PRIu64 " exceeds the file size (%zu bytes after the 8-byte prefix)", n,
                        size - 8);
    const unsigned char *hdr = base + 8;
    size_t hlen = (size_t)n;
    uint64_t data_size = (uint64_t)(size - 8 - hlen);
    const unsigned char *data = hdr + hlen;

    size_t bad = utf8_invalid_at(hdr, hlen);
    if (bad < hlen) return fail_ctx(err, errlen, label, "header is not valid UTF-8 at byte %zu", bad);

    Parser P = {hdr, hlen, 0, label, err, errlen};

    // pass 1: syntax
    if (hdr[0] != '{') return fail(&P, "header is not a JSON object (must start with '{')");
    if (skip_value(&P, 1)) return -1;
    for (; P.pos < hlen; P.pos++)
        if (hdr[P.pos] != ' ')
            return fail(&P, "unexpected byte 0x%02x at header byte %zu after the JSON object (only space padding is allowed)",
                        hdr[P.pos], P.pos);

    // pass 2: schema
    P.pos = 1;
    StTensor *ts = NULL;
    StMeta *meta = NULL;
    int nt = 0, cap = 0, seen_meta = 0, n_meta = 0;
    char nbuf[ST_MAX_NAME_BYTES + 1];
    char shown[ST_SHOWN_NAME * 4 + 8];
    StrOut name = {nbuf, ST_MAX_NAME_BYTES, 0, 0};

    skip_ws(&P);
    if (peek(&P) == '}') goto parsed;
    for (;;) {
        skip_ws(&P);
        if (parse_string(&P, &name)) goto fail;
        if (expect_char(&P, ':', "expected ':' after object key")) goto fail;
        if (str_is(&name, "__metadata__")) {
            if (seen_meta) {
                fail(&P, "duplicate __metadata__ entry");
                goto fail;
            }
            seen_meta = 1;
            if (parse_metadata(&P, &meta, &n_meta)) goto fail;
        } else {
            size_t shown_len = name.len < name.cap ? name.len : name.cap;
            show(shown, sizeof shown, nbuf, shown_len);
            if (name.len == 0) {
                fail(&P, "empty tensor name");
                goto fail;
            }
            if (name.len > ST_MAX_NAME_BYTES) {
                fail(&P, "tensor '%s': name is longer than %d bytes", shown, ST_MAX_NAME_BYTES);
                goto fail;
            }
            if (name.has_nul) {
                fail(&P, "tensor '%s': name contains a NUL character", shown);
                goto fail;
            }
            if (nt == cap) {
                if (cap > INT_MAX / 2) {
                    fail(&P, "too many tensors");
                    goto fail;
                }
                int ncap = cap ? cap * 2 : 16;
                if ((size_t)ncap > SIZE_MAX / sizeof(StTensor)) {
                    fail(&P, "too many tensors");
                    goto fail;
                }
                StTensor *nts = realloc(ts, (size_t)ncap * sizeof(StTensor));
                if (!nts) {
                    fail(&P, "out of memory");
                    goto fail;
                }
                ts = nts;
                cap = ncap;
            }
            StTensor *t = &ts[nt];
            memset(t, 0, sizeof *t);
            t->name = malloc(name.len + 1);
            if (!t->name) {
                fail(&P, "out of memory");
                goto fail;
            }
            memcpy(t->name, nbuf, name.len);
            t->name[name.len] = '\0';
            nt++;
            if (parse_tensor(&P, t, shown, data_size)) goto fail;
        }
        skip_ws(&P);
        int c = peek(&P);
        if (c == ',') {
            P.pos++;
            continue;
        }
        if (c == '}') break;
        syntax(&P, "expected ',' or '}' in object");
        goto fail;
    }

parsed:
    if (nt > 1) {
        char s1[ST_SHOWN_NAME * 4 + 8], s2[ST_SHOWN_NAME * 4 + 8];
        qsort(ts, (size_t)nt, sizeof *ts, cmp_name);
        for (int i = 1; i < nt; i++) {
            if (strcmp(ts[i - 1].name, ts[i].name) == 0) {
                fail(&P, "duplicate tensor name '%s'", show(s1, sizeof s1, ts[i].name, strlen(ts[i].name)));
                goto fail;
            }
        }
        const StTensor **by = malloc((size_t)nt * sizeof *by);
        if (!by) {
            fail(&P, "out of memory");
            goto fail;
        }
        for (int i = 0; i < nt; i++) by[i] = &ts[i];
        qsort(by, (size_t)nt, sizeof *by, cmp_begin);
        const StTensor *prev = NULL;  // non-empty tensor with the largest end so far
        for (int i = 0; i < nt; i++) {
            const StTensor *t = by[i];
            if (t->begin == t->end) continue;
            if (prev && t->begin < prev->end) {
                fail(&P,
                     "tensors '%s' [%" PRIu64 ", %" PRIu64 "] and '%s' [%" PRIu64 ", %" PRIu64
                     "] have overlapping data_offsets",
                     show(s1, sizeof s1, prev->name, strlen(prev->name)), prev->begin, prev->end,
                     show(s2, sizeof s2, t->name, strlen(t->name)), t->begin, t->end);
                free(by);
                goto fail;
            }
            if (!prev || t->end > prev->end) prev = t;
        }
        free(by);
    }
    for (int i = 0; i < nt; i++) ts[i].data = data + ts[i].begin;
    if (nt == 0) {
        free(ts);
        ts = NULL;
    }
    f->tensors = ts;
    f->n_tensors = nt;
    f->meta = meta;
    f->n_meta = n_meta;
    f->header_len = n;
    return 0;

fail:
    free_tensors(ts, nt);
    free_meta(meta, n_meta);
    return -1;
}

static void st_reset(StFile *f) {
    memset(f, 0, sizeof *f);
    f->fd = -1;
}

static char *dup_str(const char *s) {
    size_t k = strlen(s);
    char *p = malloc(k + 1);
    if (p) memcpy(p, s, k + 1);
    return p;
}

int st_parse_buffer(StFile *f, const void *data, size_t size, const char *label, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    if (!label) label = "<buffer>";
    if (!f) return fail_ctx(err, errlen, label, "no StFile given");
    st_reset(f);
    if (!data && size) return fail_ctx(err, errlen, label, "no data given");
    if (parse_file(f, (const unsigned char *)data, size, label, err, errlen)) {
        st_close(f);
        return -1;
    }
    f->path = dup_str(label);
    if (!f->path) {
        st_close(f);
        return fail_ctx(err, errlen, label, "out of memory");
    }
    return 0;
}

int st_open(StFile *f, const char *path, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    const char *label = path ? path : "<null>";
    if (!f) return fail_ctx(err, errlen, label, "no StFile given");
    st_reset(f);
    if (!path) return fail_ctx(err, errlen, label, "no path given");

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail_ctx(err, errlen, label, "cannot open: %s", strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return fail_ctx(err, errlen, label, "cannot stat: %s", strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return fail_ctx(err, errlen, label, "not a regular file");
    }
    if (sb.st_size < 8) {
        close(fd);
        return fail_ctx(err, errlen, label, "file is %lld bytes, shorter than the 8-byte header length",
                        (long long)sb.st_size);
    }
    if ((uintmax_t)sb.st_size > (uintmax_t)SIZE_MAX) {
        close(fd);
        return fail_ctx(err, errlen, label, "file is too large to map");
    }
    size_t size = (size_t)sb.st_size;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);  // the mapping keeps the file alive
    if (map == MAP_FAILED) return fail_ctx(err, errlen, label, "mmap failed: %s", strerror(e));

    if (parse_file(f, (const unsigned char *)map, size, label, err, errlen)) {
        munmap(map, size);
        st_reset(f);
        return -1;
    }
    f->map = map;
    f->map_size = size;
    f->path = dup_str(path);
    if (!f->path) {
        st_close(f);
        return fail_ctx(err, errlen, label, "out of memory");
    }
    return 0;
}

const StTensor *st_find(const StFile *f, const char *name) {
    if (!f || !name || !f->tensors || f->n_tensors <= 0) return NULL;
    size_t lo = 0, hi = (size_t)f->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, f->tensors[mid].name);
        if (c == 0) return &f->tensors[mid];
        if (c < 0) hi = mid;
        else lo = mid + 1;
    }
    return NULL;
}

void st_close(StFile *f) {
    if (!f) return;
    free_tensors(f->tensors, f->n_tensors);
    free_meta(f->meta, f->n_meta);
    if (f->map && f->map_size) munmap(f->map, f->map_size);
    // st_open never keeps the descriptor; only close one that comes with a
    // mapping, so a zeroed StFile (fd 0) never closes stdin.
    if (f->map && f->fd >= 0) close(f->fd);
    free(f->path);
    st_reset(f);
}
