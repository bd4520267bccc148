/* kvx's CPU kernels in C (issue 36), built on first use by kernels/cpu_native.py with the machine's own
 * compiler (-O3 -march=native -fopenmp) and called through ctypes.
 *
 * Why C: a CPU decode step is ~120 small matrix-vector products and 30 attentions over the cache. PyTorch's
 * int8 kernel (_weight_int8pack_mm) reads the weights at about half the memory's pace, its cost grows with
 * every row of a batch, and its activations are rounded to bfloat16; its attention is a handful of ops per
 * layer. Here each product widens the int8 weights to float32 in registers against float32 activations:
 * exact products of the dequantized weights, summed in a fixed order.
 *
 * The int8 matrices are stored tiled (cpu_native.tile): 4 rows at a time, 16 columns of each in turn, so a
 * product reads memory strictly in order. Read row by row (4 rows at once, each its own stream) the same
 * kernel reached half the memory's pace on the project's 2-core EPYC; tiled it reaches its full pace.
 *
 * Batch invariance: every activation row is computed by the same sequence of operations whatever the number
 * of rows, the thread count or the row's neighbours (one 16-lane accumulator per (activation row, output
 * row), columns ascending, a masked tail, then a fixed reduction tree), so a request's step in a batch
 * equals its step alone, bit for bit. More rows only share the weight reads.
 *
 * OpenMP: the library links libgomp.so.1, the runtime PyTorch's CPU wheel already loaded, so the loader
 * reuses it and one team of threads serves both (two teams on two cores spin against each other).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

int kvx_native_version(void) { return 2; }

/* ---------------------------------------------------------------------------------------------------------
 * The tiled layout of an [N, K] int8 matrix, N * K bytes, nothing padded. Tile t holds rows 4t .. 4t+rt-1
 * (rt = 4, or fewer in the last tile) and starts at byte 4t * K. Inside it: for each full group of 16
 * columns c, the rt rows' 16 bytes one after the other (offset c * rt * 16 + i * 16); then, when K is not a
 * multiple of 16, the rt rows' last K % 16 bytes (offset (K / 16) * rt * 16 + i * (K % 16)).
 * ------------------------------------------------------------------------------------------------------- */
__attribute__((unused)) static inline int64_t tiled_at(int64_t n, int64_t k, int64_t N, int64_t K) {
    int64_t t = n / 4, i = n % 4, rt = N - 4 * t < 4 ? N - 4 * t : 4, full = K / 16;
    int64_t base = 4 * t * K;
    if (k < full * 16) return base + (k / 16) * rt * 16 + i * 16 + k % 16;
    return base + full * rt * 16 + i * (K % 16) + (k - full * 16);
}

#ifdef __AVX512F__
static inline __mmask16 tail_mask(int64_t left) { return (__mmask16)((1u << left) - 1u); }

/* exp(x) for 16 floats: 2^n * e^r with |r| <= ln2/2, a degree-6 polynomial (rel. error ~2e-7); -inf -> 0. */
static inline __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-88.0f), hi = _mm512_set1_ps(88.0f);
    __mmask16 dead = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512 e = _mm512_scalef_ps(p, n);
    return _mm512_maskz_mov_ps(~dead, e);
}

/* Sums of RB activation rows (x, xs floats apart) against the RT weight rows of one tile (p: its first
 * byte): acc[r][i] = fma(w_i[16 columns], x_r[16 columns], acc[r][i]) for each group of columns in order,
 * the tail masked, then one reduction each. RB and RT are constants at every call (the switch below), so
 * the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile_sums(const int8_t* p, int64_t K, const float* x, int64_t xs,
                                                             int RT, int RB, float out[4][4]) {
    __m512 acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int i = 0; i < RT; i++) acc[r][i] = _mm512_setzero_ps();
    int64_t full = K / 16, kt = K % 16;
    for (int64_t c = 0; c < full; c++) {
        const int8_t* q = p + c * RT * 16;
        _mm_prefetch((const char*)(q + 1024), _MM_HINT_T0);
        __m512 w[4];
        for (int i = 0; i < RT; i++)
            w[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + i * 16))));
        for (int r = 0; r < RB; r++) {
            __m512 xv = _mm512_loadu_ps(x + r * xs + c * 16);
            for (int i = 0; i < RT; i++) acc[r][i] = _mm512_fmadd_ps(w[i], xv, acc[r][i]);
        }
    }
    if (kt) {
        __mmask16 m = tail_mask(kt);
        const int8_t* q = p + full * RT * 16;
        __m512 w[4];
        for (int i = 0; i < RT; i++) w[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + i * kt)));
        for (int r = 0; r < RB; r++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + r * xs + full * 16);
            for (int i = 0; i < RT; i++) acc[r][i] = _mm512_fmadd_ps(w[i], xv, acc[r][i]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int i = 0; i < RT; i++) out[r][i] = _mm512_reduce_add_ps(acc[r][i]);
}

#define SUMS_RB(RT) switch (rb) { \
    case 4: tile_sums(p, K, xr, xs_, RT, 4, s); break; \
    case 3: tile_sums(p, K, xr, xs_, RT, 3, s); break; \
    case 2: tile_sums(p, K, xr, xs_, RT, 2, s); break; \
    default: tile_sums(p, K, xr, xs_, RT, 1, s); break; }
#endif

/* The input a row of the product reads, made from x's row when the layer's neighbours are fused in: an RMS
 * norm (x * w / sqrt(mean(x^2) + eps), as the model's rms_norm) or SiLU(gate) * up (x's row holds gate then
 * up, K each). Per row, in a fixed order: the same whatever the batch. */
static void prepare_row(const float* x, int64_t K, const float* norm_w, float eps, int silu_mul, float* out) {
    if (silu_mul) {
        const float* up = x + K;
        int64_t k = 0;
#ifdef __AVX512F__
        for (; k + 16 <= K; k += 16) {
            __m512 g = _mm512_loadu_ps(x + k);
            __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + k)));
        }
#endif
        for (; k < K; k++) out[k] = x[k] / (1.0f + expf(-x[k])) * up[k];
        return;
    }
    double ss = 0;  /* in double: one rounding for the mean, whatever the row's length */
    for (int64_t k = 0; k < K; k++) ss += (double)x[k] * x[k];
    float inv = (float)(1.0 / sqrt(ss / (double)K + (double)eps));
    for (int64_t k = 0; k < K; k++) out[k] = (x[k] * inv) * norm_w[k];
}

/* One int8 product inside a parallel region (its loops are the team's worksharing, each ending in a barrier):
 * y[r, n] = res[r, n] + (scale[n] * sum_k W[n, k] * in[r, k] + bias[n]) for r < R, n < N, where in = x, or x
 * normed (norm_w not NULL) or SiLU(gate) * up (silu_mul: x's rows hold 2K values), made into in_buf ([R, K]).
 * W: [N, K] int8, tiled (cpu_native.tile); scale, bias, norm_w: float32 (bias, norm_w, res may be NULL);
 * x: R rows x_stride floats apart; y and res: R rows y_stride floats apart. */
static void product(const int8_t* W, const float* scale, const float* bias, const float* x, float* y,
                    int64_t R, int64_t N, int64_t K, int64_t x_stride, int64_t y_stride,
                    const float* norm_w, float eps, int silu_mul, const float* res, float* in_buf) {
    int64_t tiles = (N + 3) / 4;
    int prepared = norm_w != NULL || silu_mul;
    const float* src = prepared ? in_buf : x;
    int64_t src_stride = prepared ? K : x_stride;
    if (prepared) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) prepare_row(x + r * x_stride, K, norm_w, eps, silu_mul, in_buf + r * K);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * 4;
        int rt = N - n0 < 4 ? (int)(N - n0) : 4;
        const int8_t* p = W + n0 * K;
        for (int64_t r0 = 0; r0 < R; r0 += 4) {
            int rb = R - r0 < 4 ? (int)(R - r0) : 4;
            const float* xr = src + r0 * src_stride;
            int64_t xs_ = src_stride;  /* read by SUMS_RB */
            float s[4][4];
#ifdef __AVX512F__
            switch (rt) {
                case 4: SUMS_RB(4); break;
                case 3: SUMS_RB(3); break;
                case 2: SUMS_RB(2); break;
                default: SUMS_RB(1); break;
            }
#else
            /* portable: 16 lanes summed as the AVX-512 path does */
            for (int r = 0; r < rb; r++)
                for (int i = 0; i < rt; i++) {
                    float lane[16] = {0};
                    for (int64_t k = 0; k < K; k++)
                        lane[k % 16] += (float)p[tiled_at(n0 + i, k, N, K) - n0 * K] * xr[r * xs_ + k];
                    float acc = 0;
                    for (int j = 0; j < 16; j++) acc += lane[j];
                    s[r][i] = acc;
                }
#endif
            for (int r = 0; r < rb; r++)
                for (int i = 0; i < rt; i++) {
                    float v = s[r][i] * scale[n0 + i] + (bias ? bias[n0 + i] : 0.0f);
                    int64_t at = (r0 + r) * y_stride + n0 + i;
                    y[at] = res ? res[at] + v : v;
                }
        }
    }
}

/* One product in its own parallel region (see product). */
void kvx_int8_linear_fused(const int8_t* W, const float* scale, const float* bias, const float* x, float* y,
                           int64_t R, int64_t N, int64_t K, int64_t x_stride, int64_t y_stride,
                           const float* norm_w, float eps, int silu_mul, const float* res) {
    float* in_buf = norm_w != NULL || silu_mul ? (float*)malloc(sizeof(float) * (size_t)(R * K)) : NULL;
#pragma omp parallel
    product(W, scale, bias, x, y, R, N, K, x_stride, y_stride, norm_w, eps, silu_mul, res, in_buf);
    free(in_buf);
}

void kvx_int8_linear(const int8_t* W, const float* scale, const float* bias, const float* x, float* y,
                     int64_t R, int64_t N, int64_t K, int64_t x_stride, int64_t y_stride) {
    kvx_int8_linear_fused(W, scale, bias, x, y, R, N, K, x_stride, y_stride, NULL, 0.0f, 0, NULL);
}

/* The rest of a decoder layer after its attention, and the next layer's qkv product, in one parallel region
 * (one call a layer instead of four): x_out = x1 + down(SiLU(gate) * up) where [gate | up] = gate_up(norm(x1,
 * mlp_norm)) and x1 = x + o(attn) + o_bias; then, when qkv_w is not NULL, qkv_out = qkv(norm(x_out,
 * next_norm)) + qkv_bias. The same products, in the same order, as the one-product calls: the same bits.
 * attn: [R, Ho] (rows attn_stride apart); x, x_out: [R, D]; qkv_out: [R, Nq]; I: the MLP's width. */
void kvx_int8_layer_tail(const float* attn, int64_t attn_stride, const float* x, float* x_out, int64_t R,
                         int64_t D, int64_t Ho, int64_t I,
                         const int8_t* o_w, const float* o_scale, const float* o_bias,
                         const float* mlp_norm, const int8_t* gu_w, const float* gu_scale,
                         const int8_t* down_w, const float* down_scale, float eps,
                         const float* next_norm, const int8_t* qkv_w, const float* qkv_scale, const float* qkv_bias,
                         int64_t Nq, float* qkv_out) {
    int64_t widest = D > I ? D : I;
    float* x1 = (float*)malloc(sizeof(float) * (size_t)(R * D));
    float* gu = (float*)malloc(sizeof(float) * (size_t)(R * 2 * I));
    float* in_buf = (float*)malloc(sizeof(float) * (size_t)(R * widest));
#pragma omp parallel
    {
        product(o_w, o_scale, o_bias, attn, x1, R, D, Ho, attn_stride, D, NULL, 0.0f, 0, x, NULL);
        product(gu_w, gu_scale, NULL, x1, gu, R, 2 * I, D, D, 2 * I, mlp_norm, eps, 0, NULL, in_buf);
        product(down_w, down_scale, NULL, gu, x_out, R, D, I, 2 * I, D, NULL, 0.0f, 1, x1, in_buf);
        if (qkv_w != NULL)
            product(qkv_w, qkv_scale, qkv_bias, x_out, qkv_out, R, Nq, D, D, Nq, next_norm, eps, 0, NULL, in_buf);
    }
    free(x1);
    free(gu);
    free(in_buf);
}

/* ---------------------------------------------------------------------------------------------------------
 * Paged decode attention: the CPU twin of kernels/triton_paged.py (see reference.paged_decode_attention).
 * A segment is one (sequence, kv head): its G query heads share its keys. Its keys are cut into chunks of
 * CHUNK in position order (a fixed size, so the work and its rounding do not depend on the thread count, the
 * batch or where the pool put the blocks); each chunk gives a partial softmax (max, sum, weighted values)
 * and the chunks are combined in order. Logits are kept (scratch) so that the attention mass, when asked
 * for, is each key's probability summed over the G heads.
 * ------------------------------------------------------------------------------------------------------- */

#define CHUNK 256

static inline float dot_f(const float* a, const float* b, int64_t d) {
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
    if (k < d) {
        __mmask16 m = tail_mask(d - k);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0;
    for (int64_t k = 0; k < d; k++) s += a[k] * b[k];
    return s;
#endif
}

static inline void axpy_f(float* o, float p, const float* v, int64_t d) {
#ifdef __AVX512F__
    __m512 pv = _mm512_set1_ps(p);
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) _mm512_storeu_ps(o + k, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + k), _mm512_loadu_ps(o + k)));
    if (k < d) {
        __mmask16 m = tail_mask(d - k);
        _mm512_mask_storeu_ps(o + k, m, _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m, v + k), _mm512_maskz_loadu_ps(m, o + k)));
    }
#else
    for (int64_t k = 0; k < d; k++) o[k] += p * v[k];
#endif
}

#ifdef __AVX512F__
/* out lane j = the sum of x[j]'s 16 lanes, for 16 vectors at once (a transposing tree of shuffles and adds,
 * where 16 separate reductions would cost 4x the instructions). */
static inline __m512 reduce16(const __m512 x[16]) {
    __m512 y[8], z[4];
    for (int i = 0; i < 8; i++)
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xEE));
    for (int k = 0; k < 4; k++)  /* z[k]'s 128-bit block b: key 4k + b */
        z[k] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * k], y[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(y[2 * k], y[2 * k + 1], 0xDD));
    __m512 w0 = _mm512_add_ps(_mm512_unpacklo_ps(z[0], z[1]), _mm512_unpackhi_ps(z[0], z[1]));
    __m512 w1 = _mm512_add_ps(_mm512_unpacklo_ps(z[2], z[3]), _mm512_unpackhi_ps(z[2], z[3]));
    __m512 u = _mm512_add_ps(_mm512_unpacklo_ps(w0, w1), _mm512_unpackhi_ps(w0, w1));
    /* u's block b holds keys b, 8 + b, 4 + b, 12 + b */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, u);
}

/* lg[j] = scale * q . k[j] for j < len, 16 keys at a time; d = 16 * DV. */
static inline __attribute__((always_inline)) void logits_regs(const float* q, const float* const* k, int64_t len,
                                                               int DV, float scale, float* lg) {
    __m512 qv[16];
    for (int c = 0; c < DV; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
    const __m512 sv = _mm512_set1_ps(scale);
    for (int64_t j0 = 0; j0 < len; j0 += 16) {
        __m512 a[16];
        int m = len - j0 < 16 ? (int)(len - j0) : 16;
        for (int jj = 0; jj < 16; jj++) {
            a[jj] = _mm512_setzero_ps();
            if (jj < m)
                for (int c = 0; c < DV; c++) a[jj] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k[j0 + jj] + 16 * c), a[jj]);
        }
        __m512 r = _mm512_mul_ps(reduce16(a), sv);
        if (m == 16) _mm512_storeu_ps(lg + j0, r);
        else _mm512_mask_storeu_ps(lg + j0, tail_mask(m), r);
    }
}
#endif

#ifdef __AVX512F__
/* Every query head of a segment against the chunk's keys in one pass over them (each key read once): lg[g * n
 * + j] = scale * q_g . k[j]. The same operations per head as logits_regs, so the same bits. */
static inline __attribute__((always_inline)) void logits_heads(const float* q, const float* const* k, int64_t len,
                                                                int G, int DV, float scale, float* lg, int64_t n) {
    __m512 qv[8][8];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < DV; c++) qv[g][c] = _mm512_loadu_ps(q + g * 16 * DV + 16 * c);
    const __m512 sv = _mm512_set1_ps(scale);
    __m512 tmp[8][16];
    for (int64_t j0 = 0; j0 < len; j0 += 16) {
        int m = len - j0 < 16 ? (int)(len - j0) : 16;
        for (int jj = 0; jj < 16; jj++) {
            if (jj < m) {
                __m512 kv[8];
                for (int c = 0; c < DV; c++) kv[c] = _mm512_loadu_ps(k[j0 + jj] + 16 * c);
                for (int g = 0; g < G; g++) {
                    __m512 a = _mm512_setzero_ps();
                    for (int c = 0; c < DV; c++) a = _mm512_fmadd_ps(qv[g][c], kv[c], a);
                    tmp[g][jj] = a;
                }
            } else {
                for (int g = 0; g < G; g++) tmp[g][jj] = _mm512_setzero_ps();
            }
        }
        for (int g = 0; g < G; g++) {
            __m512 r = _mm512_mul_ps(reduce16(tmp[g]), sv);
            if (m == 16) _mm512_storeu_ps(lg + g * n + j0, r);
            else _mm512_mask_storeu_ps(lg + g * n + j0, tail_mask(m), r);
        }
    }
}

/* o_g[:d] = sum_j p[g][j] * v[j] for every head g in one pass over the values (each read once). */
static inline __attribute__((always_inline)) void wsum_heads(const float* p, int64_t pstride, const float* const* v,
                                                              int64_t len, int G, int DV, float* o, int64_t ostride) {
    __m512 acc[6][8];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < DV; c++) acc[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j++) {
        __m512 vv[8];
        for (int c = 0; c < DV; c++) vv[c] = _mm512_loadu_ps(v[j] + 16 * c);
        for (int g = 0; g < G; g++) {
            __m512 pb = _mm512_set1_ps(p[g * pstride + j]);
            for (int c = 0; c < DV; c++) acc[g][c] = _mm512_fmadd_ps(pb, vv[c], acc[g][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < DV; c++) _mm512_storeu_ps(o + g * ostride + 16 * c, acc[g][c]);
}

#define HEADS_CASES(CALL, DV) switch (G) { \
    case 1: CALL(1, DV); return 1; case 2: CALL(2, DV); return 1; case 3: CALL(3, DV); return 1; \
    case 4: CALL(4, DV); return 1; case 5: CALL(5, DV); return 1; case 6: CALL(6, DV); return 1; \
    default: return 0; }

/* The all-heads passes where the heads' accumulators fit the registers (d 64 with up to 6 heads, d 128 with
 * up to 3); returns 0 elsewhere (the caller goes head by head). */
static int chunk_logits_heads(const float* q, int64_t G, const float* const* k, int64_t len, int64_t d, float scale,
                              float* lg, int64_t n) {
#define LOGITS(GG, DV) logits_heads(q, k, len, GG, DV, scale, lg, n)
    if (d == 64) { HEADS_CASES(LOGITS, 4) }
    if (d == 128 && G <= 3) { HEADS_CASES(LOGITS, 8) }
#undef LOGITS
    return 0;
}

static int weighted_sums_heads(const float* p, int64_t pstride, int64_t G, const float* const* v, int64_t len,
                               int64_t d, float* o, int64_t ostride) {
#define WSUM(GG, DV) wsum_heads(p, pstride, v, len, GG, DV, o, ostride)
    if (d == 64) { HEADS_CASES(WSUM, 4) }
    if (d == 128 && G <= 3) { HEADS_CASES(WSUM, 8) }
#undef WSUM
    return 0;
}

#endif

/* lg[j] = scale * q . k[j][:d] for j < len. */
static void chunk_logits(const float* q, const float* const* k, int64_t len, int64_t d, float scale, float* lg) {
#ifdef __AVX512F__
    switch (d) {
        case 64: logits_regs(q, k, len, 4, scale, lg); return;
        case 128: logits_regs(q, k, len, 8, scale, lg); return;
        default: break;
    }
#endif
    for (int64_t j = 0; j < len; j++) lg[j] = dot_f(q, k[j], d) * scale;
}

/* o[:d] = sum_j p[j] * v[j][:d], j ascending (p[j] == 0 skipped). With AVX-512 and d a multiple of 16 up to
 * 256 the sum stays in registers; the order of the additions is the same either way. */
static inline __attribute__((always_inline)) void wsum_regs(const float* p, const float* const* v, int64_t len,
                                                             int DV, float* o) {
#ifdef __AVX512F__
    __m512 acc[16];
    for (int c = 0; c < DV; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j++) {
        if (p[j] == 0.0f) continue;
        __m512 pv = _mm512_set1_ps(p[j]);
        for (int c = 0; c < DV; c++) acc[c] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v[j] + 16 * c), acc[c]);
    }
    for (int c = 0; c < DV; c++) _mm512_storeu_ps(o + 16 * c, acc[c]);
#endif
}

static void weighted_sum(const float* p, const float* const* v, int64_t len, int64_t d, float* o) {
#ifdef __AVX512F__
    switch (d) {
        case 64: wsum_regs(p, v, len, 4, o); return;
        case 128: wsum_regs(p, v, len, 8, o); return;
        case 256: wsum_regs(p, v, len, 16, o); return;
        default: break;
    }
#endif
    memset(o, 0, sizeof(float) * d);
    for (int64_t j = 0; j < len; j++)
        if (p[j] != 0.0f) axpy_f(o, p[j], v[j], d);
}


/* out[i] = exp(x[i] - m) for i < n; returns their sum (summed in a fixed order). */
static float exp_shift(float* x, int64_t n, float m) {
#ifdef __AVX512F__
    __m512 mv = _mm512_set1_ps(m), acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        __mmask16 k = tail_mask(n - i);
        __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv)));
        _mm512_mask_storeu_ps(x + i, k, e);
        acc = _mm512_add_ps(acc, e);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0;
    for (int64_t i = 0; i < n; i++) { x[i] = expf(x[i] - m); s += x[i]; }
    return s;
#endif
}

/* q: [N, G, d]; k_pool, v_pool: [slots, d]; tables: [N, W] int32 block ids (block size B); lengths: [N];
 * out: [N, G, d]. mass (NULL: none) [slots] with mass_mode [N] (0 leave, 1 add, 2 replace); window > 0 hides
 * keys with q_pos[i] - pos[slot] >= window (pos: [slots] int64). scratch: sum(lengths) * G floats, the
 * logits kept for the mass (NULL without it).
 * k_new, v_new ([N, d]) and pos_new ([N]), when not NULL: the step's new entries, written first at each
 * segment's entry lengths[i] - 1 (the engine's decode step appends one token per segment). */
/* a segment's length, within what its table row can address (as the reference clamps it) */
static inline int64_t seg_len(const int32_t* lengths, int64_t i, int64_t most) {
    int64_t n = lengths[i];
    return n < 0 ? 0 : (n > most ? most : n);
}

void kvx_paged_decode(const float* q, float* k_pool, float* v_pool, const int32_t* tables,
                      int64_t W, const int32_t* lengths, int64_t N, int64_t G, int64_t d, int64_t B, float scale,
                      float* out, float* mass, const int32_t* mass_mode, int64_t* pos, const int64_t* q_pos,
                      int64_t window, float* scratch, const float* k_new, const float* v_new, const int64_t* pos_new) {
    /* the step's new entries first (each segment's last, entry lengths[i] - 1), so that they are attended */
    if (k_new != NULL)
        for (int64_t i = 0; i < N; i++) {
            if (lengths[i] <= 0 || lengths[i] > W * B) continue;
            int64_t j = lengths[i] - 1, slot = (int64_t)tables[i * W + j / B] * B + j % B;
            memcpy(k_pool + slot * d, k_new + i * d, sizeof(float) * d);
            memcpy(v_pool + slot * d, v_new + i * d, sizeof(float) * d);
            if (pos_new != NULL) pos[slot] = pos_new[i];
        }
    int64_t* first_item = (int64_t*)malloc(sizeof(int64_t) * (N + 1));
    int64_t* first_logit = (int64_t*)malloc(sizeof(int64_t) * (N + 1));
    first_item[0] = first_logit[0] = 0;
    for (int64_t i = 0; i < N; i++) {
        int64_t n = seg_len(lengths, i, W * B);
        first_item[i + 1] = first_item[i] + (n + CHUNK - 1) / CHUNK;
        first_logit[i + 1] = first_logit[i] + n * G;
    }
    int64_t items = first_item[N];
    /* per chunk and head: max, sum, weighted values */
    float* part = (float*)malloc(sizeof(float) * (items > 0 ? items : 1) * G * (d + 2));
#pragma omp parallel
    {
        float* probs = (float*)malloc(sizeof(float) * CHUNK * (G > 0 ? G : 1));
        /* without the mass the logits are needed only while their chunk is worked on */
        float* chunk_lg = mass == NULL ? (float*)malloc(sizeof(float) * CHUNK * (G > 0 ? G : 1)) : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            int64_t i = 0, lo = 0, hi = N;  /* the segment holding chunk `it`: binary search */
            while (hi - lo > 1) { int64_t mid = (lo + hi) / 2; if (first_item[mid] <= it) lo = mid; else hi = mid; }
            i = lo;
            int64_t n = seg_len(lengths, i, W * B), c0 = (it - first_item[i]) * CHUNK, c1 = c0 + CHUNK < n ? c0 + CHUNK : n, len = c1 - c0;
            const int32_t* tab = tables + i * W;
            /* logits of head g, key j (c0 <= j < c1): lg[g * ls + loff + j - c0]; kept whole for the mass */
            float* lg = mass != NULL ? scratch + first_logit[i] : chunk_lg;
            int64_t ls = mass != NULL ? n : CHUNK, loff = mass != NULL ? c0 : 0;
            float* pm = part + it * G * (d + 2);   /* [G][max, sum, d values] */
            const float* qi = q + i * G * d;
            const float* vrow[CHUNK];
            const float* krow[CHUNK];
            for (int64_t j = c0; j < c1; j++) {
                int64_t slot = (int64_t)tab[j / B] * B + j % B;
                krow[j - c0] = k_pool + slot * d;
                vrow[j - c0] = v_pool + slot * d;
            }
#ifdef __AVX512F__
            if (!chunk_logits_heads(qi, G, krow, len, d, scale, lg + loff, ls))
#endif
                for (int64_t g = 0; g < G; g++) chunk_logits(qi + g * d, krow, len, d, scale, lg + g * ls + loff);
            if (window > 0)
                for (int64_t j = c0; j < c1; j++) {
                    int64_t slot = (int64_t)tab[j / B] * B + j % B;
                    if (q_pos[i] - pos[slot] >= window)
                        for (int64_t g = 0; g < G; g++) lg[g * ls + loff + j - c0] = -INFINITY;
                }
            /* the chunk's probabilities per head go to a copy: the logits stay for the mass */
            float* p = probs;
            for (int64_t g = 0; g < G; g++) {
                float* l = lg + g * ls + loff;
                float m = -INFINITY;
                for (int64_t j = 0; j < len; j++) m = l[j] > m ? l[j] : m;
                pm[g * (d + 2)] = m;
                if (m == -INFINITY) {  /* every key hidden: no weight anywhere */
                    pm[g * (d + 2) + 1] = 0;
                    memset(p + g * CHUNK, 0, sizeof(float) * len);
                    continue;
                }
                memcpy(p + g * CHUNK, l, sizeof(float) * len);
                pm[g * (d + 2) + 1] = exp_shift(p + g * CHUNK, len, m);
            }
#ifdef __AVX512F__
            if (!weighted_sums_heads(p, CHUNK, G, vrow, len, d, pm + 2, d + 2))
#endif
                for (int64_t g = 0; g < G; g++) weighted_sum(p + g * CHUNK, vrow, len, d, pm + g * (d + 2) + 2);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N; i++) {
            int64_t n = seg_len(lengths, i, W * B);
            for (int64_t g = 0; g < G; g++) {
                float* o = out + (i * G + g) * d;
                memset(o, 0, sizeof(float) * d);
                float M = -INFINITY, S = 0;
                for (int64_t it = first_item[i]; it < first_item[i + 1]; it++) {
                    float m = part[(it * G + g) * (d + 2)];
                    M = m > M ? m : M;
                }
                if (M == -INFINITY) continue;  /* empty, or every key hidden: zeros, as the reference */
                for (int64_t it = first_item[i]; it < first_item[i + 1]; it++) {
                    const float* pm = part + (it * G + g) * (d + 2);
                    if (pm[0] == -INFINITY) continue;
                    float f = expf(pm[0] - M);
                    S += pm[1] * f;
                    axpy_f(o, f, pm + 2, d);
                }
                float inv = 1.0f / S;
                for (int64_t k = 0; k < d; k++) o[k] *= inv;
                part[(first_item[i] * G + g) * (d + 2)] = M;  /* kept for the mass below */
                part[(first_item[i] * G + g) * (d + 2) + 1] = S;
            }
            if (mass != NULL && n > 0 && mass_mode[i] != 0) {
                const int32_t* tab = tables + i * W;
                const float* lg = scratch + first_logit[i];
                for (int64_t j = 0; j < n; j++) {
                    float s = 0;
                    for (int64_t g = 0; g < G; g++) {
                        float M = part[(first_item[i] * G + g) * (d + 2)], S = part[(first_item[i] * G + g) * (d + 2) + 1];
                        float l = lg[g * n + j];
                        if (M != -INFINITY && l != -INFINITY) s += expf(l - M) / S;
                    }
                    int64_t slot = (int64_t)tab[j / B] * B + j % B;
                    if (mass_mode[i] == 2) mass[slot] = s; else mass[slot] += s;
                }
            }
        }
        free(probs);
        free(chunk_lg);
    }
    free(part);
    free(first_item);
    free(first_logit);
}
