/* MXFP4 quantize + pack in one pass per 32-element block, for qstream's CPU path.
 *
 * Bit-identical to qstream.format.mxfp4_ref.quantize_ref and qstream.format.mxfp4.quantize:
 *  - the block exponent comes from the float32 bits of amax (RCEIL's R, or the FLOOR/EVEN rule);
 *  - MSE3 compares, for E in {R, R-1, ...} (MSE3_SEARCHED candidates), the EXACT sum of squares of d = q - y0 (float32, R units)
 *    over the elements with y0 > 1/16 (the rest round to zero under every candidate). Each such d is a
 *    multiple of 2^-27 below 4.5 in magnitude, so d * 2^27 is an int32 and the sum of 32 squares fits
 *    a uint64: integer sums are exact and order-free, so ties resolve as the rational reference does;
 *  - elements round to the E2M1 grid to nearest, ties to the even code (the midpoint table below).
 * The rule codes and MSE3_SEARCHED come from qstream/format/rules.py as -D flags (kernels/cpu.py).
 * Plain C11, no intrinsics: compiled with -O3 -ffp-contract=off, for the machine's CPU where kernels/cpu.py knows
 * its flags (-mavx2) or the compiler's generic target; without fast-math or fused multiply-adds every IEEE
 * operation rounds the same on every x86-64 (or other) machine.
 * Threads: a call's blocks are cut into one job per thread, run by worker threads kept between calls (run_jobs).
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 32
#define E_MIN (-127)
#define E_MAX 127

enum { DT_BF16 = 0, DT_F16 = 1, DT_F32 = 2 };
#if !defined(RULE_FLOOR) || !defined(RULE_EVEN) || !defined(RULE_RCEIL) || !defined(RULE_MSE3) || !defined(MSE3_SEARCHED)
#error "build through qstream/format/kernels/cpu.py, which passes the rule table as -D flags"
#endif

typedef struct {
    double sq_error, sq_norm;
    int64_t counts[3];
    int64_t nonfinite;
} Acc;

typedef struct {
    const void *src;
    int dtype, rule;
    int64_t b0, b1;
    uint8_t *packed, *scales;
    Acc acc;
} Job;

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* 2^k as float32 for k in [-127, 127]; 2^-127 is the subnormal 0x00400000. */
static inline float pow2f(int k) { return k >= -126 ? u2f((uint32_t)(k + 127) << 23) : u2f(0x00400000u); }

/* float16 bits -> float32, exact for normals, subnormals, Inf and NaN. */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu;
    float mag = u2f(em << 13) * 0x1p112f;           /* rebias 15 -> 127; subnormals become normals */
    uint32_t bits = em >= 0x7c00u ? 0x7f800000u | (em & 0x3ffu) << 13 : f2u(mag);
    return u2f(sign | bits);
}

static void load_block(const void *src, int dtype, int64_t b, float x[BLOCK]) {
    if (dtype == DT_BF16) {
        const uint16_t *p = (const uint16_t *)src + b * BLOCK;
        for (int i = 0; i < BLOCK; i++) x[i] = u2f((uint32_t)p[i] << 16);
    } else if (dtype == DT_F16) {
        const uint16_t *p = (const uint16_t *)src + b * BLOCK;
        for (int i = 0; i < BLOCK; i++) x[i] = half_to_float(p[i]);
    } else {
        memcpy(x, (const float *)src + b * BLOCK, sizeof(float) * BLOCK);
    }
}

/* Per-block exponent of the closed-form rules from amax's float32 bits (amax = m * 2^F). */
static inline int rule_exponent(uint32_t amax_bits, int rule) {
    if (amax_bits < 0x00800000u) return E_MIN; /* zero or subnormal: every rule lands below -127 */
    int f = (int)(amax_bits >> 23) - 127;
    uint32_t mant = amax_bits & 0x7fffffu;
    int up = rule == RULE_FLOOR ? 0 : rule == RULE_EVEN ? mant >= 0x600000u : mant > 0x400000u;
    int e = f - 2 + up;
    return e < E_MIN ? E_MIN : e > E_MAX ? E_MAX : e;
}

/* Nearest E2M1 magnitude index of y >= 0, ties to the even index (midpoints of mxfp4.E2M1_MIDPOINTS). */
static inline int e2m1_index(float y) {
    return (y > 0.25f) + (y >= 0.75f) + (y > 1.25f) + (y >= 1.75f) + (y > 2.5f) + (y >= 3.5f) + (y > 5.0f);
}

/* The same rounding as a value: the grid steps by 0.5 below 2, by 1 below 4, by 2 up to 6 (no table gather). */
static inline float e2m1_round(float y) {
    return 0.5f * (float)((y > 0.25f) + (y >= 0.75f) + (y > 1.25f) + (y >= 1.75f)
                          + 2 * ((y > 2.5f) + (y >= 3.5f)) + 4 * (y > 5.0f));
}

/* Offset s in 0..MSE3_SEARCHED-1 (E = R - s) of least exact squared error; ties keep the smaller s. */
static int mse3_offset(const float a[BLOCK], int r) {
    float y0[BLOCK];
    float inv = pow2f(-r);
    for (int i = 0; i < BLOCK; i++) {
        float v = a[i] * inv;
        y0[i] = v > 0.0625f ? v : 0.0f; /* excluded elements round to 0 under every candidate */
    }
    uint64_t best = 0;
    int best_s = 0;
    for (int s = 0; s < MSE3_SEARCHED && r - s >= E_MIN; s++) {
        float up = (float)(1 << s), down = 1.0f / up;
        uint64_t err = 0;
        for (int i = 0; i < BLOCK; i++) {
            float d = e2m1_round(y0[i] * up) * down - y0[i];
            uint32_t k = (uint32_t)(int32_t)(u2f(f2u(d) & 0x7fffffffu) * 0x1p27f); /* |d| * 2^27, exact */
            err += (uint64_t)k * k;
        }
        if (s == 0 || err < best) { best = err; best_s = s; }
    }
    return best_s;
}

static void quantize_block(const float x[BLOCK], int rule, uint8_t *packed, uint8_t *scale, Acc *acc) {
    float a[BLOCK];
    uint32_t amax_bits = 0;
    for (int i = 0; i < BLOCK; i++) {
        uint32_t u = f2u(x[i]) & 0x7fffffffu;
        a[i] = u2f(u);
        amax_bits = u > amax_bits ? u : amax_bits;
    }
    if (amax_bits >= 0x7f800000u) { /* NaN or Inf: count, write nothing meaningful */
        for (int i = 0; i < BLOCK; i++) acc->nonfinite += (f2u(a[i]) >= 0x7f800000u);
        return;
    }
    int r = rule_exponent(amax_bits, RULE_RCEIL);
    int e = rule == RULE_MSE3 ? r - mse3_offset(a, r) : rule_exponent(amax_bits, rule);
    float inv = pow2f(-e);
    uint8_t codes[BLOCK];
    double err = 0.0, norm = 0.0;
    for (int i = 0; i < BLOCK; i++) {
        float y = a[i] * inv;
        int idx = e2m1_index(y);
        double d = (double)(e2m1_round(y) - y);
        err += d * d;
        norm += (double)x[i] * (double)x[i];
        codes[i] = (uint8_t)(idx | ((f2u(x[i]) >> 31) & (idx > 0)) << 3);
    }
    for (int j = 0; j < BLOCK / 2; j++) packed[j] = (uint8_t)(codes[2 * j] | codes[2 * j + 1] << 4);
    *scale = (uint8_t)(e + 127);
    int off = r - e;
    acc->counts[off < 0 ? 0 : off > 2 ? 2 : off]++;
    /* err * 2^(2e): exact power-of-two scaling in double (|2e| <= 254) */
    uint64_t p2 = (uint64_t)(2 * e + 1023) << 52;
    double scale2;
    memcpy(&scale2, &p2, 8);
    acc->sq_error += err * scale2;
    acc->sq_norm += norm;
}

static void *run_job(void *arg) {
    Job *job = arg;
    float x[BLOCK];
    for (int64_t b = job->b0; b < job->b1; b++) {
        load_block(job->src, job->dtype, b, x);
        quantize_block(x, job->rule, job->packed + b * (BLOCK / 2), job->scales + b, &job->acc);
    }
    return NULL;
}

#define MAX_THREADS 256

/* Threads started per call and joined after it (the fallback path). */
static void run_spawned(Job *jobs, int n) {
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < n; t++) started[t] = t > 0 && pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0;
    for (int t = 0; t < n; t++) if (!started[t]) run_job(&jobs[t]); /* job 0 here, others if a thread failed */
    for (int t = 1; t < n; t++) if (started[t]) pthread_join(tids[t], NULL);
}

/* Worker threads kept between calls. Starting 15 threads for each 1 M-element call cost about as much as the
 * call's work on 16 cores; woken workers cost a fraction of that. One caller at a time uses the pool (another
 * caller meanwhile spawns its own threads), a forked child starts a pool of its own, and the jobs are the same
 * either way, so the bytes and sums are too. Job t runs on worker t (1 <= t < n) or, where the system refused a
 * thread, on the caller. */
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;  /* held by the caller using the pool */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;  /* guards what follows */
static pthread_cond_t pool_go = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static int pool_size = 0, pool_njobs = 0, pool_pending = 0, pool_forkable = 0;
static unsigned long pool_round = 0, pool_born[MAX_THREADS];  /* round counter; the round before each's first */
static int pool_ids[MAX_THREADS];
static Job *pool_jobs = NULL;

static void *pool_worker(void *arg) {
    int id = *(int *)arg;
    pthread_mutex_lock(&pool_lock);
    unsigned long seen = pool_born[id];
    for (;;) {
        while (pool_round == seen) pthread_cond_wait(&pool_go, &pool_lock);
        seen = pool_round;
        if (id < pool_njobs) {
            Job *job = &pool_jobs[id];
            pthread_mutex_unlock(&pool_lock);
            run_job(job);
            pthread_mutex_lock(&pool_lock);
            if (--pool_pending == 0) pthread_cond_signal(&pool_done);
        }
    }
    return NULL;
}

static void pool_before_fork(void) { pthread_mutex_lock(&pool_busy); pthread_mutex_lock(&pool_lock); }
static void pool_after_fork(void) { pthread_mutex_unlock(&pool_lock); pthread_mutex_unlock(&pool_busy); }
static void pool_in_child(void) {  /* the workers stayed in the parent, and the conditions count them as waiting */
    pool_size = 0;
    pthread_cond_init(&pool_go, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_after_fork();
}

static void run_jobs(Job *jobs, int n) {
    if (n < 2 || pthread_mutex_trylock(&pool_busy) != 0) {
        run_spawned(jobs, n);
        return;
    }
    pthread_mutex_lock(&pool_lock);
    if (!pool_forkable) pool_forkable = pthread_atfork(pool_before_fork, pool_after_fork, pool_in_child) == 0;
    if (!pool_forkable) {  /* a pool a fork could copy mid-call: none */
        pthread_mutex_unlock(&pool_lock);
        pthread_mutex_unlock(&pool_busy);
        run_spawned(jobs, n);
        return;
    }
    while (pool_size < n - 1) {
        int id = pool_size + 1;
        pthread_t tid;
        pool_ids[id] = id;
        pool_born[id] = pool_round;
        if (pthread_create(&tid, NULL, pool_worker, &pool_ids[id]) != 0) break;
        pthread_detach(tid);
        pool_size = id;
    }
    int workers = pool_size < n - 1 ? pool_size : n - 1;
    pool_jobs = jobs;
    pool_njobs = workers + 1;
    pool_pending = workers;
    pool_round++;
    pthread_cond_broadcast(&pool_go);
    pthread_mutex_unlock(&pool_lock);
    run_job(&jobs[0]);
    for (int t = workers + 1; t < n; t++) run_job(&jobs[t]);
    pthread_mutex_lock(&pool_lock);
    while (pool_pending > 0) pthread_cond_wait(&pool_done, &pool_lock);
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&pool_busy);
}

/* Quantize nblocks consecutive 32-element blocks of src. stats <- {sq_error, sq_norm}, counts <- blocks at
 * offsets. Returns the number of NaN/Inf elements (0 on success), or -1 on bad arguments. */
int64_t qstream_mxfp4_quantize(const void *src, int dtype, int64_t nblocks, int rule, int nthreads,
                               uint8_t *packed, uint8_t *scales, double *stats, int64_t *counts) {
    int known = rule == RULE_FLOOR || rule == RULE_EVEN || rule == RULE_RCEIL || rule == RULE_MSE3;
    if (dtype < DT_BF16 || dtype > DT_F32 || !known || nblocks < 0) return -1;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if ((int64_t)nthreads > nblocks) nthreads = nblocks > 0 ? (int)nblocks : 1;
    Job jobs[MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        Job j = {src, dtype, rule, nblocks * t / nthreads, nblocks * (t + 1) / nthreads, packed, scales, {0}};
        jobs[t] = j;
    }
    run_jobs(jobs, nthreads);
    double sq_error = 0.0, sq_norm = 0.0;
    int64_t nonfinite = 0;
    counts[0] = counts[1] = counts[2] = 0;
    for (int t = 0; t < nthreads; t++) {
        sq_error += jobs[t].acc.sq_error;
        sq_norm += jobs[t].acc.sq_norm;
        nonfinite += jobs[t].acc.nonfinite;
        for (int k = 0; k < 3; k++) counts[k] += jobs[t].acc.counts[k];
    }
    stats[0] = sq_error;
    stats[1] = sq_norm;
    return nonfinite;
}
