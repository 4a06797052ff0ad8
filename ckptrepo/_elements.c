/* The codec's per-element loops in C (ckptrepo._elements): byte planes split and joined in
 * one pass, zigzag differences taken and added back in one pass, and a delta's planes joined
 * and added back to its base in one pass, for elements of 2, 4 and 8 bytes.
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

CLONES static void zigzag2(const uint8_t *restrict n, const uint8_t *restrict b, uint8_t *restrict z, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint16_t x, y;
        memcpy(&x, n + i * 2, 2);
        memcpy(&y, b + i * 2, 2);
        uint16_t d = (uint16_t)(x - y);
        uint16_t v = (uint16_t)((uint16_t)(d << 1) ^ (uint16_t)((int16_t)d >> 15));
        memcpy(z + i * 2, &v, 2);
    }
}

CLONES static void unzigzag2(uint8_t *restrict acc, const uint8_t *restrict z, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint16_t a, v;
        memcpy(&a, acc + i * 2, 2);
        memcpy(&v, z + i * 2, 2);
        a = (uint16_t)(a + UNZIGZAG(uint16_t, v));
        memcpy(acc + i * 2, &a, 2);
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

CLONES static void zigzag4(const uint8_t *restrict n, const uint8_t *restrict b, uint8_t *restrict z, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t x, y;
        memcpy(&x, n + i * 4, 4);
        memcpy(&y, b + i * 4, 4);
        uint32_t d = (uint32_t)(x - y);
        uint32_t v = (uint32_t)((uint32_t)(d << 1) ^ (uint32_t)((int32_t)d >> 31));
        memcpy(z + i * 4, &v, 4);
    }
}

CLONES static void unzigzag4(uint8_t *restrict acc, const uint8_t *restrict z, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t a, v;
        memcpy(&a, acc + i * 4, 4);
        memcpy(&v, z + i * 4, 4);
        a = (uint32_t)(a + UNZIGZAG(uint32_t, v));
        memcpy(acc + i * 4, &a, 4);
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

CLONES static void zigzag8(const uint8_t *restrict n, const uint8_t *restrict b, uint8_t *restrict z, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t x, y;
        memcpy(&x, n + i * 8, 8);
        memcpy(&y, b + i * 8, 8);
        uint64_t d = (uint64_t)(x - y);
        uint64_t v = (uint64_t)((uint64_t)(d << 1) ^ (uint64_t)((int64_t)d >> 63));
        memcpy(z + i * 8, &v, 8);
    }
}

CLONES static void unzigzag8(uint8_t *restrict acc, const uint8_t *restrict z, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t a, v;
        memcpy(&a, acc + i * 8, 8);
        memcpy(&v, z + i * 8, 8);
        a = (uint64_t)(a + UNZIGZAG(uint64_t, v));
        memcpy(acc + i * 8, &a, 8);
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ckptrepo._elements", "The codec's per-element loops in C.", 0, methods,
};

PyMODINIT_FUNC PyInit__elements(void) { return PyModule_Create(&module); }
