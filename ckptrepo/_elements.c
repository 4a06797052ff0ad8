/* The codec's per-element loops in C (ckptrepo._elements): byte planes split and joined in
 * one pass, zigzag differences taken and added back in one pass, and a delta's planes joined
 * and added back to its base in one pass, for elements of 2, 4 and 8 bytes; and the decoder
 * of the context coder's rANS stream (entropy.py), at the end of this file.
 *
 * They give exactly the bytes of the numpy forms in codec.py (tests/test_element_kernels.py
 * holds them to it). They are C, built when the package is installed, rather than numba,
 * because a process loads them in 0.2 ms: loading numba and the cached machine code of the
 * same loops cost a process about a second of CPU, so a training process that resumed from
 * one checkpoint ran its checkout on the slower numpy forms (docs/benchmarks.md).
 *
 * Every call takes whole buffers (anything with the buffer protocol, C-contiguous), checks
 * their lengths against each other before touching them, and releases the GIL for the loop,
 * so the data path's threads run them side by side. Bytes are addressed one by one for the
 * planes (plane i holds byte i of each element, the format's definition, whatever the host's
 * byte order) and elements are read and written with memcpy, so no buffer needs aligning.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
/* The differences are taken on little-endian integers (docs/format.md); on another host
 * the build of this optional module fails and codec.py's numpy forms run instead. */
#error "ckptrepo._elements assumes a little-endian host"
#endif

/* Each loop is compiled for three x86-64 levels and the loader picks the best one the CPU has
 * (AVX-512, AVX2, SSE2): a build for the baseline alone took 2.5x the CPU to join 8-byte
 * elements (0.50-0.54 s per GiB against 0.19-0.21 s) and 1.3x for 4-byte deltas, on the
 * machine the benchmarks ran on. Elsewhere, one portable build. */
#if defined(__x86_64__) && defined(__linux__) && ((defined(__GNUC__) && __GNUC__ >= 12 && !defined(__clang__)) || (defined(__clang__) && __clang_major__ >= 14))
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define MAX_BUFFERS 9 /* eight planes and one output */

/* Buffers of one call: acquired together, released together. */
typedef struct {
    Py_buffer views[MAX_BUFFERS];
    int count;
} Buffers;

static void release(Buffers *b) {
    for (int i = 0; i < b->count; i++) {
        PyBuffer_Release(&b->views[i]);
    }
    b->count = 0;
}

/* Whether views[i] shares a byte with another view. */
static int overlaps(Buffers *b, int i) {
    const char *start = b->views[i].buf, *end = start + b->views[i].len;
    for (int j = 0; j < b->count; j++) {
        const char *other = b->views[j].buf;
        if (j != i && b->views[i].len && b->views[j].len && start < other + b->views[j].len && other < end) {
            return 1;
        }
    }
    return 0;
}

/* Acquire args[first:first+n]; the last `writable` of them must be writable, and may share no
 * byte with any other (the loops are compiled on that promise). */
static int acquire(Buffers *b, PyObject *const *args, Py_ssize_t first, Py_ssize_t n, Py_ssize_t writable) {
    for (Py_ssize_t i = 0; i < n; i++) {
        int flags = (i >= n - writable) ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS;
        if (PyObject_GetBuffer(args[first + i], &b->views[b->count], flags) < 0) {
            release(b);
            return -1;
        }
        b->count++;
    }
    for (int i = b->count - (int)writable; i < b->count; i++) {
        if (overlaps(b, i)) {
            PyErr_SetString(PyExc_ValueError, "an output buffer overlaps another buffer of the call");
            release(b);
            return -1;
        }
    }
    return 0;
}

static int check_width(Py_ssize_t width) {
    if (width == 2 || width == 4 || width == 8) {
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "element width must be 2, 4 or 8, not %zd", width);
    return -1;
}

/* Every view in views[first:first+n] holds `len` bytes. */
static int check_lengths(Buffers *b, int first, int n, Py_ssize_t len, const char *what) {
    for (int i = first; i < first + n; i++) {
        if (b->views[i].len != len) {
            PyErr_Format(PyExc_ValueError, "%s %d holds %zd bytes, expected %zd", what, i - first,
                         b->views[i].len, len);
            return -1;
        }
    }
    return 0;
}

/* --- the loops ------------------------------------------------------------------------------ */

/* One function per width with restrict pointers: plane k and the output never overlap, and
 * saying so lets the compiler vectorise without a run-time overlap check per pair. Elements
 * are whole words (one load for a split, one store for a join, built from all planes at
 * once): a plane at a time was a strided byte store per element, 3-5x slower for the join. */

/* unzigzag(v) = (v >> 1) ^ -(v & 1) */
#define UNZIGZAG(T, v) ((T)((T)((v) >> 1) ^ (T)((T)0 - (T)((v) & 1))))

/* zigzagW: z = zigzag(new - base); unzigzagW: acc += unzigzag(z); on W-byte little-endian
 * elements of unsigned type T (signed S). The two loops differ between widths only in their
 * types, so one definition serves all three widths. */
#define DIFFERENCE_LOOPS(W, T, S)                                                                         \
    CLONES static void zigzag##W(const uint8_t *restrict n, const uint8_t *restrict b, uint8_t *restrict z, \
                                 Py_ssize_t count) {                                                      \
        for (Py_ssize_t i = 0; i < count; i++) {                                                          \
            T x, y;                                                                                       \
            memcpy(&x, n + i * W, W);                                                                     \
            memcpy(&y, b + i * W, W);                                                                     \
            T d = (T)(x - y);                                                                             \
            T v = (T)((T)(d << 1) ^ (T)((S)d >> (8 * W - 1)));                                            \
            memcpy(z + i * W, &v, W);                                                                     \
        }                                                                                                 \
    }                                                                                                     \
    CLONES static void unzigzag##W(uint8_t *restrict acc, const uint8_t *restrict z, Py_ssize_t count) {   \
        for (Py_ssize_t i = 0; i < count; i++) {                                                          \
            T a, v;                                                                                       \
            memcpy(&a, acc + i * W, W);                                                                   \
            memcpy(&v, z + i * W, W);                                                                     \
            a = (T)(a + UNZIGZAG(T, v));                                                                  \
            memcpy(acc + i * W, &a, W);                                                                   \
        }                                                                                                 \
    }

DIFFERENCE_LOOPS(2, uint16_t, int16_t)
DIFFERENCE_LOOPS(4, uint32_t, int32_t)
DIFFERENCE_LOOPS(8, uint64_t, int64_t)

CLONES static void split2(const uint8_t *restrict src, uint8_t *restrict p0, uint8_t *restrict p1, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint16_t v;
        memcpy(&v, src + i * 2, 2);
        p0[i] = (uint8_t)(v >> 0);
        p1[i] = (uint8_t)(v >> 8);
    }
}

CLONES static void join2(const uint8_t *restrict p0, const uint8_t *restrict p1, uint8_t *restrict out, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint16_t v = ((uint16_t)p0[i] << 0) | ((uint16_t)p1[i] << 8);
        memcpy(out + i * 2, &v, 2);
    }
}

CLONES static void join_unzigzag2(const uint8_t *restrict p0, const uint8_t *restrict p1, uint8_t *restrict acc, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint16_t a, v = ((uint16_t)p0[i] << 0) | ((uint16_t)p1[i] << 8);
        memcpy(&a, acc + i * 2, 2);
        a = (uint16_t)(a + UNZIGZAG(uint16_t, v));
        memcpy(acc + i * 2, &a, 2);
    }
}

CLONES static void split4(const uint8_t *restrict src, uint8_t *restrict p0, uint8_t *restrict p1, uint8_t *restrict p2, uint8_t *restrict p3, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t v;
        memcpy(&v, src + i * 4, 4);
        p0[i] = (uint8_t)(v >> 0);
        p1[i] = (uint8_t)(v >> 8);
        p2[i] = (uint8_t)(v >> 16);
        p3[i] = (uint8_t)(v >> 24);
    }
}

CLONES static void join4(const uint8_t *restrict p0, const uint8_t *restrict p1, const uint8_t *restrict p2, const uint8_t *restrict p3, uint8_t *restrict out, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t v = ((uint32_t)p0[i] << 0) | ((uint32_t)p1[i] << 8) | ((uint32_t)p2[i] << 16) | ((uint32_t)p3[i] << 24);
        memcpy(out + i * 4, &v, 4);
    }
}

CLONES static void join_unzigzag4(const uint8_t *restrict p0, const uint8_t *restrict p1, const uint8_t *restrict p2, const uint8_t *restrict p3, uint8_t *restrict acc, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t a, v = ((uint32_t)p0[i] << 0) | ((uint32_t)p1[i] << 8) | ((uint32_t)p2[i] << 16) | ((uint32_t)p3[i] << 24);
        memcpy(&a, acc + i * 4, 4);
        a = (uint32_t)(a + UNZIGZAG(uint32_t, v));
        memcpy(acc + i * 4, &a, 4);
    }
}

CLONES static void split8(const uint8_t *restrict src, uint8_t *restrict p0, uint8_t *restrict p1, uint8_t *restrict p2, uint8_t *restrict p3, uint8_t *restrict p4, uint8_t *restrict p5, uint8_t *restrict p6, uint8_t *restrict p7, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t v;
        memcpy(&v, src + i * 8, 8);
        p0[i] = (uint8_t)(v >> 0);
        p1[i] = (uint8_t)(v >> 8);
        p2[i] = (uint8_t)(v >> 16);
        p3[i] = (uint8_t)(v >> 24);
        p4[i] = (uint8_t)(v >> 32);
        p5[i] = (uint8_t)(v >> 40);
        p6[i] = (uint8_t)(v >> 48);
        p7[i] = (uint8_t)(v >> 56);
    }
}

CLONES static void join8(const uint8_t *restrict p0, const uint8_t *restrict p1, const uint8_t *restrict p2, const uint8_t *restrict p3, const uint8_t *restrict p4, const uint8_t *restrict p5, const uint8_t *restrict p6, const uint8_t *restrict p7, uint8_t *restrict out, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t v = ((uint64_t)p0[i] << 0) | ((uint64_t)p1[i] << 8) | ((uint64_t)p2[i] << 16) | ((uint64_t)p3[i] << 24) | ((uint64_t)p4[i] << 32) | ((uint64_t)p5[i] << 40) | ((uint64_t)p6[i] << 48) | ((uint64_t)p7[i] << 56);
        memcpy(out + i * 8, &v, 8);
    }
}

CLONES static void join_unzigzag8(const uint8_t *restrict p0, const uint8_t *restrict p1, const uint8_t *restrict p2, const uint8_t *restrict p3, const uint8_t *restrict p4, const uint8_t *restrict p5, const uint8_t *restrict p6, const uint8_t *restrict p7, uint8_t *restrict acc, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t a, v = ((uint64_t)p0[i] << 0) | ((uint64_t)p1[i] << 8) | ((uint64_t)p2[i] << 16) | ((uint64_t)p3[i] << 24) | ((uint64_t)p4[i] << 32) | ((uint64_t)p5[i] << 40) | ((uint64_t)p6[i] << 48) | ((uint64_t)p7[i] << 56);
        memcpy(&a, acc + i * 8, 8);
        a = (uint64_t)(a + UNZIGZAG(uint64_t, v));
        memcpy(acc + i * 8, &a, 8);
    }
}

static void split_any(const uint8_t *src, uint8_t **p, Py_ssize_t count, int width) {
    switch (width) {
    case 2: split2(src, p[0], p[1], count); break;
    case 4: split4(src, p[0], p[1], p[2], p[3], count); break;
    default: split8(src, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], count); break;
    }
}

static void join_any(const uint8_t **p, uint8_t *out, Py_ssize_t count, int width) {
    switch (width) {
    case 2: join2(p[0], p[1], out, count); break;
    case 4: join4(p[0], p[1], p[2], p[3], out, count); break;
    default: join8(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], out, count); break;
    }
}

static void zigzag_any(const uint8_t *n, const uint8_t *b, uint8_t *z, Py_ssize_t count, int width) {
    switch (width) {
    case 2: zigzag2(n, b, z, count); break;
    case 4: zigzag4(n, b, z, count); break;
    default: zigzag8(n, b, z, count); break;
    }
}

static void unzigzag_any(uint8_t *acc, const uint8_t *z, Py_ssize_t count, int width) {
    switch (width) {
    case 2: unzigzag2(acc, z, count); break;
    case 4: unzigzag4(acc, z, count); break;
    default: unzigzag8(acc, z, count); break;
    }
}

static void join_unzigzag_any(const uint8_t **p, uint8_t *acc, Py_ssize_t count, int width) {
    switch (width) {
    case 2: join_unzigzag2(p[0], p[1], acc, count); break;
    case 4: join_unzigzag4(p[0], p[1], p[2], p[3], acc, count); break;
    default: join_unzigzag8(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], acc, count); break;
    }
}

/* --- the calls ------------------------------------------------------------------------------ */

static int whole_elements(Py_ssize_t len, Py_ssize_t width, const char *what) {
    if (len % width == 0) {
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, not whole elements of %zd", what, len, width);
    return -1;
}

/* split(src, p0, ..., p{w-1}): plane k gets byte k of each of src's elements. */
static PyObject *split(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t width = nargs - 1;
    if (check_width(width) < 0) {
        return NULL;
    }
    Buffers b = {.count = 0};
    if (acquire(&b, args, 0, nargs, width) < 0) {
        return NULL;
    }
    Py_ssize_t count = b.views[0].len / width;
    if (whole_elements(b.views[0].len, width, "source") < 0 || check_lengths(&b, 1, (int)width, count, "plane") < 0) {
        release(&b);
        return NULL;
    }
    uint8_t *planes[8];
    for (int k = 0; k < width; k++) {
        planes[k] = b.views[1 + k].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    split_any(b.views[0].buf, planes, count, (int)width);
    Py_END_ALLOW_THREADS
    release(&b);
    Py_RETURN_NONE;
}

/* The loops that read byte planes and write one buffer of their elements (join, join_unzigzag). */
typedef void (*PlanesLoop)(const uint8_t **planes, uint8_t *out, Py_ssize_t count, int width);

/* f(p0, ..., p{w-1}, out): `loop` over the planes into the last buffer, which `what` names in
 * errors. */
static PyObject *planes_into(PyObject *const *args, Py_ssize_t nargs, const char *what, PlanesLoop loop) {
    Py_ssize_t width = nargs - 1;
    if (check_width(width) < 0) {
        return NULL;
    }
    Buffers b = {.count = 0};
    if (acquire(&b, args, 0, nargs, 1) < 0) {
        return NULL;
    }
    Py_buffer *out = &b.views[width];
    Py_ssize_t count = out->len / width;
    if (whole_elements(out->len, width, what) < 0 || check_lengths(&b, 0, (int)width, count, "plane") < 0) {
        release(&b);
        return NULL;
    }
    const uint8_t *planes[8];
    for (int k = 0; k < width; k++) {
        planes[k] = b.views[k].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    loop(planes, out->buf, count, (int)width);
    Py_END_ALLOW_THREADS
    release(&b);
    Py_RETURN_NONE;
}

/* join(p0, ..., p{w-1}, out): the inverse of split. */
static PyObject *join(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return planes_into(args, nargs, "output", join_any);
}

/* join_unzigzag(p0, ..., p{w-1}, acc): acc += unzigzag(join(planes)). */
static PyObject *join_unzigzag(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return planes_into(args, nargs, "sum", join_unzigzag_any);
}

/* The width, the last of exactly `expected` arguments; -1 with an exception set otherwise. */
static Py_ssize_t width_arg(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, const char *usage) {
    if (nargs != expected) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    Py_ssize_t width = PyLong_AsSsize_t(args[expected - 1]);
    if (width == -1 && PyErr_Occurred()) {
        return -1;
    }
    return check_width(width) < 0 ? -1 : width;
}

/* zigzag(new, base, z, width) */
static PyObject *zigzag(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t width = width_arg(args, nargs, 4, "zigzag(new, base, z, width)");
    if (width < 0) {
        return NULL;
    }
    Buffers b = {.count = 0};
    if (acquire(&b, args, 0, 3, 1) < 0) {
        return NULL;
    }
    Py_ssize_t len = b.views[2].len;
    if (whole_elements(len, width, "difference") < 0 || check_lengths(&b, 0, 2, len, "operand") < 0) {
        release(&b);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    zigzag_any(b.views[0].buf, b.views[1].buf, b.views[2].buf, len / width, (int)width);
    Py_END_ALLOW_THREADS
    release(&b);
    Py_RETURN_NONE;
}

/* unzigzag(acc, z, width): acc += unzigzag(z) */
static PyObject *unzigzag(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t width = width_arg(args, nargs, 3, "unzigzag(acc, z, width)");
    if (width < 0) {
        return NULL;
    }
    Buffers b = {.count = 0};
    /* acc first and writable: acquire z, then acc, so "the last one" is acc. */
    PyObject *const order[2] = {args[1], args[0]};
    if (acquire(&b, order, 0, 2, 1) < 0) {
        return NULL;
    }
    Py_ssize_t len = b.views[1].len;
    if (whole_elements(len, width, "sum") < 0 || check_lengths(&b, 0, 1, len, "difference") < 0) {
        release(&b);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    unzigzag_any(b.views[1].buf, b.views[0].buf, len / width, (int)width);
    Py_END_ALLOW_THREADS
    release(&b);
    Py_RETURN_NONE;
}

/* --- the context coder ---------------------------------------------------------------------- */

/* The loops of entropy.py's "ans" coding: counting the symbols, the rANS encoder and decoder.
 * ans_kernels.py has the same three in numba, for a process without this extension; they give
 * the same counts, the same stream and the same problem codes. Here so that a process coding
 * 16-bit float deltas (a resuming run, the CLI, a bf16 training run) need not load numba,
 * about a second of CPU and 100 MB. One 32-bit state, 16-bit words, probabilities in 14 bits. */

#define ANS_PROB_BITS 14
#define ANS_PROB_SCALE (1 << ANS_PROB_BITS)
#define ANS_STATE_LOW ((uint64_t)1 << 16)
#define ANS_ESCAPE 7 /* the main symbol that escapes; the main alphabet is ESCAPE + 1 */
#define ANS_RAW 63   /* the escape symbol that escapes to a raw value; the escape alphabet is RAW + 1 */
#define ANS_MOVE_CAP 4
enum { ANS_OK, ANS_BAD_MODEL, ANS_TRUNCATED, ANS_RAW_SHORT, ANS_LEFT_OVER, ANS_RAW_LEFT };

static inline uint16_t load16(const uint8_t *p, Py_ssize_t i) {
    uint16_t v;
    memcpy(&v, p + 2 * i, 2);
    return v;
}

static inline int64_t load64(const uint8_t *p, Py_ssize_t i) {
    int64_t v;
    memcpy(&v, p + 8 * i, 8);
    return v;
}

/* Takes the next word into the state when it fell below ANS_STATE_LOW; 0 if none is left. */
static inline int ans_refill(uint64_t *state, const uint8_t *words, Py_ssize_t nwords, Py_ssize_t *position) {
    if (*state >= ANS_STATE_LOW) {
        return 1;
    }
    if (*position >= nwords) {
        return 0;
    }
    *state = (*state << 16) | load16(words, (*position)++);
    return 1;
}

/* The escape symbol of a difference of at least ANS_ESCAPE: its excess, or ANS_RAW for a raw value. */
static inline int64_t ans_escape_of(int64_t value) {
    return value - ANS_ESCAPE < ANS_RAW ? value - ANS_ESCAPE : ANS_RAW;
}

/* The state after taking off the symbol of frequency `freq` and start `cum` that `slot` fell in. */
static inline uint64_t ans_pop(uint64_t state, uint64_t freq, int64_t cum, int64_t slot) {
    return freq * (state >> ANS_PROB_BITS) + (uint64_t)(slot - cum);
}

/* The exponent field and the moves switch, the last three arguments of the coder's calls. */
typedef struct {
    int shift;
    int64_t mask;
    int use_moves;
    Py_ssize_t exponents, contexts; /* rows of the escape and of the main models */
} AnsField;

static inline void ans_context(const AnsField *f, const uint8_t *base, const uint8_t *moves, Py_ssize_t i,
                               int64_t *exponent, int64_t *context) {
    *exponent = ((int64_t)load16(base, i) >> f->shift) & f->mask;
    *context = *exponent;
    if (f->use_moves) {
        int64_t move = moves[i];
        *context = *exponent * (ANS_MOVE_CAP + 1) + (move < ANS_MOVE_CAP ? move : ANS_MOVE_CAP);
    }
}

CLONES static int ans_decode_loop(const uint8_t *restrict words, Py_ssize_t nwords, const uint8_t *restrict raw,
                                  Py_ssize_t nraw, const uint8_t *restrict base, const uint8_t *restrict moves,
                                  const AnsField *f, const uint8_t *restrict main_freq,
                                  const uint8_t *restrict main_cum, const uint8_t *restrict escape_freq,
                                  const uint8_t *restrict escape_cum, uint8_t *restrict out, Py_ssize_t n) {
    if (nwords < 2) {
        return ANS_TRUNCATED;
    }
    uint64_t state = ((uint64_t)load16(words, 0) << 16) | load16(words, 1);
    Py_ssize_t position = 2, raw_used = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t exponent, context;
        ans_context(f, base, moves, i, &exponent, &context);
        int64_t slot = (int64_t)(state & (ANS_PROB_SCALE - 1));
        /* Counted without a branch, as in ans_kernels: a search stopping at the symbol is
         * mispredicted about once an element. */
        int64_t symbol = 0;
        for (int k = 1; k <= ANS_ESCAPE; k++) {
            symbol += slot >= load64(main_cum, context * (ANS_ESCAPE + 2) + k);
        }
        uint64_t freq = (uint64_t)load64(main_freq, context * (ANS_ESCAPE + 1) + symbol);
        if (freq == 0) {
            return ANS_BAD_MODEL;
        }
        state = ans_pop(state, freq, load64(main_cum, context * (ANS_ESCAPE + 2) + symbol), slot);
        if (!ans_refill(&state, words, nwords, &position)) {
            return ANS_TRUNCATED;
        }
        uint16_t value = (uint16_t)symbol;
        if (symbol == ANS_ESCAPE) {
            slot = (int64_t)(state & (ANS_PROB_SCALE - 1));
            int64_t escape = 0;
            while (escape < ANS_RAW && slot >= load64(escape_cum, exponent * (ANS_RAW + 2) + escape + 1)) {
                escape++;
            }
            freq = (uint64_t)load64(escape_freq, exponent * (ANS_RAW + 1) + escape);
            if (freq == 0) {
                return ANS_BAD_MODEL;
            }
            state = ans_pop(state, freq, load64(escape_cum, exponent * (ANS_RAW + 2) + escape), slot);
            if (!ans_refill(&state, words, nwords, &position)) {
                return ANS_TRUNCATED;
            }
            if (escape < ANS_RAW) {
                value = (uint16_t)(ANS_ESCAPE + escape);
            } else {
                if (raw_used >= nraw) {
                    return ANS_RAW_SHORT;
                }
                value = load16(raw, raw_used++);
            }
        }
        memcpy(out + 2 * i, &value, 2);
    }
    if (position != nwords || state != ANS_STATE_LOW) {
        return ANS_LEFT_OVER;
    }
    return raw_used == nraw ? ANS_OK : ANS_RAW_LEFT;
}

/* Every view in views[first:first+n] holds a whole number of `size`-byte values. */
static int whole_values(Buffers *b, int first, int n, Py_ssize_t size, const char *const *names) {
    for (int i = first; i < first + n; i++) {
        if (b->views[i].len % size) {
            PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, not whole values of %zd", names[i - first],
                         b->views[i].len, size);
            return -1;
        }
    }
    return 0;
}

static int ans_field(PyObject *const *args, AnsField *f) {
    Py_ssize_t shift = PyLong_AsSsize_t(args[0]);
    if (shift == -1 && PyErr_Occurred()) {
        return -1;
    }
    Py_ssize_t mask = PyLong_AsSsize_t(args[1]);
    if (mask == -1 && PyErr_Occurred()) {
        return -1;
    }
    int use_moves = PyObject_IsTrue(args[2]);
    if (use_moves < 0) {
        return -1;
    }
    if (shift < 0 || shift > 15 || mask < 1 || mask > 255 || (mask & (mask + 1))) {
        PyErr_Format(PyExc_ValueError, "bad exponent field: shift %zd, mask %zd", shift, mask);
        return -1;
    }
    f->shift = (int)shift;
    f->mask = mask;
    f->use_moves = use_moves;
    f->exponents = mask + 1;
    f->contexts = f->exponents * (use_moves ? ANS_MOVE_CAP + 1 : 1);
    return 0;
}

/* views[at] and views[at+1] are the n values' bases (u16) and, with moves, their moves (u8). */
static int check_bases(Buffers *b, int at, Py_ssize_t n, const AnsField *f) {
    if (check_lengths(b, at, 1, 2 * n, "base") < 0) {
        return -1;
    }
    return f->use_moves ? check_lengths(b, at + 1, 1, n, "moves") : 0;
}

/* views[at:at+4] are the models: main frequencies, main starts, escape frequencies, escape
 * starts (int64 rows); without starts (a count), views[at:at+2] are the two count tables. */
static int check_models(Buffers *b, int at, const AnsField *f, int with_starts) {
    static const char *const names[] = {"main frequencies", "main starts", "escape frequencies", "escape starts"};
    static const char *const counts[] = {"main counts", "escape counts"};
    if (!with_starts) {
        return check_lengths(b, at, 1, 8 * f->contexts * (ANS_ESCAPE + 1), counts[0]) < 0 ||
                       check_lengths(b, at + 1, 1, 8 * f->exponents * (ANS_RAW + 1), counts[1]) < 0
                   ? -1
                   : 0;
    }
    if (whole_values(b, at, 4, 8, names) < 0 ||
        check_lengths(b, at, 1, 8 * f->contexts * (ANS_ESCAPE + 1), names[0]) < 0 ||
        check_lengths(b, at + 1, 1, 8 * f->contexts * (ANS_ESCAPE + 2), names[1]) < 0 ||
        check_lengths(b, at + 2, 1, 8 * f->exponents * (ANS_RAW + 1), names[2]) < 0 ||
        check_lengths(b, at + 3, 1, 8 * f->exponents * (ANS_RAW + 2), names[3]) < 0) {
        return -1;
    }
    return 0;
}

/* ans_decode(words, raw, base, moves, main_freq, main_cum, escape_freq, escape_cum, out,
 * shift, mask, use_moves) -> problem code (0: OK), as ans_kernels.decode. words, raw, base
 * and out are u16, moves u8, the models int64 rows (main: 8 frequencies, 9 starts; escape: 64
 * and 65), one row per context: (mask + 1) * 5 main rows with use_moves, else mask + 1. */
static PyObject *ans_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    AnsField f;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError,
                        "ans_decode(words, raw, base, moves, main_freq, main_cum, escape_freq, escape_cum, out, "
                        "shift, mask, use_moves)");
        return NULL;
    }
    if (ans_field(args + 9, &f) < 0) {
        return NULL;
    }
    Buffers b = {.count = 0};
    if (acquire(&b, args, 0, 9, 1) < 0) {
        return NULL;
    }
    static const char *const u16_names[] = {"words", "raw"};
    Py_ssize_t n = b.views[8].len / 2;
    if (whole_values(&b, 0, 2, 2, u16_names) < 0 || whole_elements(b.views[8].len, 2, "output") < 0 ||
        check_bases(&b, 2, n, &f) < 0 || check_models(&b, 4, &f, 1) < 0) {
        release(&b);
        return NULL;
    }
    int problem;
    Py_BEGIN_ALLOW_THREADS
    problem = ans_decode_loop(b.views[0].buf, b.views[0].len / 2, b.views[1].buf, b.views[1].len / 2, b.views[2].buf,
                              b.views[3].buf, &f, b.views[4].buf, b.views[5].buf,
                              b.views[6].buf, b.views[7].buf, b.views[8].buf, n);
    Py_END_ALLOW_THREADS
    release(&b);
    return PyLong_FromLong(problem);
}

/* table[index] += 1, the table int64 values at any alignment. */
static inline void ans_count_one(uint8_t *table, int64_t index) {
    int64_t count;
    memcpy(&count, table + 8 * index, 8);
    count++;
    memcpy(table + 8 * index, &count, 8);
}

CLONES static void ans_count_loop(const uint8_t *restrict z, const uint8_t *restrict base, const uint8_t *restrict moves,
                                  const AnsField *f, uint8_t *restrict main_counts, uint8_t *restrict escape_counts,
                                  Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t exponent, context;
        ans_context(f, base, moves, i, &exponent, &context);
        int64_t value = load16(z, i);
        ans_count_one(main_counts, context * (ANS_ESCAPE + 1) + (value < ANS_ESCAPE ? value : ANS_ESCAPE));
        if (value >= ANS_ESCAPE) {
            ans_count_one(escape_counts, exponent * (ANS_RAW + 1) + ans_escape_of(value));
        }
    }
}

/* ans_count(z, base, moves, main_counts, escape_counts, shift, mask, use_moves): add every
 * element's symbols to the counts (int64 rows) of their models, as ans_kernels.count. */
static PyObject *ans_count(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    AnsField f;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "ans_count(z, base, moves, main_counts, escape_counts, shift, mask, use_moves)");
        return NULL;
    }
    if (ans_field(args + 5, &f) < 0) {
        return NULL;
    }
    Buffers b = {.count = 0};
    if (acquire(&b, args, 0, 5, 2) < 0) {
        return NULL;
    }
    Py_ssize_t n = b.views[0].len / 2;
    if (whole_elements(b.views[0].len, 2, "differences") < 0 || check_bases(&b, 1, n, &f) < 0 ||
        check_models(&b, 3, &f, 0) < 0) {
        release(&b);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    ans_count_loop(b.views[0].buf, b.views[1].buf, b.views[2].buf, &f, b.views[3].buf, b.views[4].buf, n);
    Py_END_ALLOW_THREADS
    release(&b);
    Py_RETURN_NONE;
}

/* Codes one symbol of frequency `freq` (> 0) and start `cum` into the state, first pushing its
 * low word out where the state would otherwise outgrow 32 bits; 0 if `words` has no room. */
static inline int ans_push(uint64_t *state, uint64_t freq, uint64_t cum, uint8_t *words, Py_ssize_t *position) {
    if (*state >= freq << (32 - ANS_PROB_BITS)) {
        if (*position <= 0) {
            return 0;
        }
        uint16_t word = (uint16_t)(*state & 0xFFFF);
        memcpy(words + 2 * --(*position), &word, 2);
        *state >>= 16;
    }
    /* Below 2^32 here (the spill saw to it) and freq at most 2^14: a 32-bit division, which
     * the CPU does in fewer cycles than a 64-bit one. */
    uint32_t x = (uint32_t)*state, d = (uint32_t)freq;
    *state = ((uint64_t)(x / d) << ANS_PROB_BITS) + x % d + cum;
    return 1;
}

/* The encoder's results besides a start position: a symbol its model gives no probability,
 * or a words buffer too short for the stream (the caller sizes it: a bug, never bad input). */
enum { ANS_UNCODABLE = -1, ANS_NO_ROOM = -2 };

CLONES static Py_ssize_t ans_encode_loop(const uint8_t *restrict z, const uint8_t *restrict base,
                                         const uint8_t *restrict moves, const AnsField *f,
                                         const uint8_t *restrict main_freq, const uint8_t *restrict main_cum,
                                         const uint8_t *restrict escape_freq, const uint8_t *restrict escape_cum,
                                         uint8_t *restrict words, Py_ssize_t nwords, Py_ssize_t n) {
    uint64_t state = ANS_STATE_LOW;
    Py_ssize_t position = nwords;
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        int64_t exponent, context;
        ans_context(f, base, moves, i, &exponent, &context);
        int64_t value = load16(z, i);
        int64_t symbol = value;
        if (value >= ANS_ESCAPE) {
            /* The escape symbol is read after the main one, so it goes in first. */
            int64_t escape = ans_escape_of(value);
            uint64_t freq = (uint64_t)load64(escape_freq, exponent * (ANS_RAW + 1) + escape);
            if (freq == 0) {
                return ANS_UNCODABLE;
            }
            if (!ans_push(&state, freq, (uint64_t)load64(escape_cum, exponent * (ANS_RAW + 2) + escape), words, &position)) {
                return ANS_NO_ROOM;
            }
            symbol = ANS_ESCAPE;
        }
        uint64_t freq = (uint64_t)load64(main_freq, context * (ANS_ESCAPE + 1) + symbol);
        if (freq == 0) {
            return ANS_UNCODABLE;
        }
        if (!ans_push(&state, freq, (uint64_t)load64(main_cum, context * (ANS_ESCAPE + 2) + symbol), words, &position)) {
            return ANS_NO_ROOM;
        }
    }
    if (position < 2) {
        return ANS_NO_ROOM;
    }
    uint16_t high = (uint16_t)(state >> 16), low = (uint16_t)(state & 0xFFFF);
    memcpy(words + 2 * (position - 1), &low, 2);
    memcpy(words + 2 * (position - 2), &high, 2);
    return position - 2;
}

/* ans_encode(z, base, moves, main_freq, main_cum, escape_freq, escape_cum, words, shift, mask,
 * use_moves) -> where the stream starts in words (u16), written from the end backwards, as
 * ans_kernels.encode; -1 if a symbol's model gives it no probability, -2 if words is too
 * short. */
static PyObject *ans_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    AnsField f;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError,
                        "ans_encode(z, base, moves, main_freq, main_cum, escape_freq, escape_cum, words, shift, mask, "
                        "use_moves)");
        return NULL;
    }
    if (ans_field(args + 8, &f) < 0) {
        return NULL;
    }
    Buffers b = {.count = 0};
    if (acquire(&b, args, 0, 8, 1) < 0) {
        return NULL;
    }
    static const char *const u16_names[] = {"words"};
    Py_ssize_t n = b.views[0].len / 2;
    if (whole_elements(b.views[0].len, 2, "differences") < 0 || whole_values(&b, 7, 1, 2, u16_names) < 0 ||
        check_bases(&b, 1, n, &f) < 0 || check_models(&b, 3, &f, 1) < 0) {
        release(&b);
        return NULL;
    }
    Py_ssize_t start;
    Py_BEGIN_ALLOW_THREADS
    start = ans_encode_loop(b.views[0].buf, b.views[1].buf, b.views[2].buf, &f, b.views[3].buf, b.views[4].buf,
                            b.views[5].buf, b.views[6].buf, b.views[7].buf, b.views[7].len / 2, n);
    Py_END_ALLOW_THREADS
    release(&b);
    return PyLong_FromSsize_t(start);
}

static PyMethodDef methods[] = {
    {"split", (PyCFunction)(void (*)(void))split, METH_FASTCALL,
     "split(src, p0, ..., p{w-1}): plane k gets byte k of each element of src (w: 2, 4 or 8)."},
    {"join", (PyCFunction)(void (*)(void))join, METH_FASTCALL,
     "join(p0, ..., p{w-1}, out): the inverse of split."},
    {"zigzag", (PyCFunction)(void (*)(void))zigzag, METH_FASTCALL,
     "zigzag(new, base, z, width): z = zigzag(new - base) per little-endian element."},
    {"unzigzag", (PyCFunction)(void (*)(void))unzigzag, METH_FASTCALL,
     "unzigzag(acc, z, width): acc += unzigzag(z) per little-endian element."},
    {"join_unzigzag", (PyCFunction)(void (*)(void))join_unzigzag, METH_FASTCALL,
     "join_unzigzag(p0, ..., p{w-1}, acc): acc += unzigzag(join(planes))."},
    {"ans_count", (PyCFunction)(void (*)(void))ans_count, METH_FASTCALL,
     "ans_count(z, base, moves, main_counts, escape_counts, shift, mask, use_moves): the context coder's "
     "symbol counts (ans_kernels.count)."},
    {"ans_encode", (PyCFunction)(void (*)(void))ans_encode, METH_FASTCALL,
     "ans_encode(z, base, moves, main_freq, main_cum, escape_freq, escape_cum, words, shift, mask, use_moves) "
     "-> start: the context coder's rANS encoder (ans_kernels.encode)."},
    {"ans_decode", (PyCFunction)(void (*)(void))ans_decode, METH_FASTCALL,
     "ans_decode(words, raw, base, moves, main_freq, main_cum, escape_freq, escape_cum, out, shift, mask, "
     "use_moves) -> problem code: the context coder's rANS decoder (ans_kernels.decode)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ckptrepo._elements", "The codec's per-element loops in C.", 0, methods,
};

PyMODINIT_FUNC PyInit__elements(void) { return PyModule_Create(&module); }
