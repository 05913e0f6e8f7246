// sdcore::attention_bf16: scaled dot-product attention on the CPU in bfloat16 for head dimensions of
// at most 48, with AVX512-BF16 dot products. SD1.5's level-0 self-attention ([2, 8, 4096, 40] at 512²)
// is a third of a UNet step on the CPU; ATen's flash kernel runs it at about a quarter of this CPU's
// bf16 rate. sdcore/cpu_attention.py builds this file (g++, once, cached) and routes the shapes it
// takes here; bench/attention_kernel.py times it against ATen.
//
// Per task (one head, QB query rows), for each tile of KB keys: S = Q K^T with vdpbf16ps (K packed per
// tile as pairs of its head dimension, so a tile's rows are contiguous: a 16 KB stride between them
// thrashed L1), the online softmax in float32 (row max, exp2 with log2(e) folded into the scale,
// running sum, rescaled accumulator), P rounded to bfloat16, then acc += P V with vdpbf16ps (V packed as
// pairs of keys). -DSKIP_QK / -DSKIP_SM / -DSKIP_PV leave a section out, to time the others (with
// -DOP=another_name).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

// 2^x for x <= 0: 2^round(x) times a degree-5 Taylor polynomial of 2^f on [-0.5, 0.5] (relative error
// ~3e-6, far below the bfloat16 rounding P gets next)
static inline __m512 exp2_512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.3333558146e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108665e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650696e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718056e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

constexpr int QB = 64, KB = 256, DP = 48;   // q rows per task, kv columns per tile, head dim padded

static inline __m512bh bcast_pair(const void* p) { return (__m512bh)_mm512_set1_epi32(*(const int32_t*)p); }
static inline __m512bh load_bh(const void* p) { return (__m512bh)_mm512_loadu_si512(p); }

// q [B, H, N, D], k and v [B, H, M, D], bfloat16; D even and <= 48, N a multiple of QB, M of KB
static at::Tensor attention(const at::Tensor& q4, const at::Tensor& k4, const at::Tensor& v4) {
    TORCH_CHECK(q4.dim() == 4 && k4.dim() == 4 && q4.scalar_type() == at::kBFloat16 && k4.scalar_type() == at::kBFloat16
                && v4.scalar_type() == at::kBFloat16, "attention_bf16: 4-d bfloat16 tensors expected");
    const int64_t B = q4.size(0), H = q4.size(1), BH = B * H, N = q4.size(2), M = k4.size(2), D = q4.size(3), P2 = D / 2;
    TORCH_CHECK(k4.sizes() == v4.sizes() && k4.size(0) == B && k4.size(1) == H && k4.size(3) == D,
                "attention_bf16: k and v must be [B, H, M, D] for q [B, H, N, D]");
    TORCH_CHECK(D <= DP && D % 2 == 0 && N % QB == 0 && M % KB == 0,
                "attention_bf16: head dimension even and <= 48, queries a multiple of 64, keys of 256");
    auto q = q4.reshape({BH, N, D}).contiguous(), k = k4.reshape({BH, M, D}).contiguous(), v = v4.reshape({BH, M, D}).contiguous();
    auto out = at::empty_like(q);
    const float scale = 1.4426950408889634f / std::sqrt((float)D);
    // k per tile of KB keys, as pairs of its head dimension: kp [BH, M/KB, D/2, KB, 2];
    // v as pairs of keys, head dimension zero-padded: vp [BH, M/2, DP, 2]
    auto kp = k.view({BH, M / KB, KB, P2, 2}).permute({0, 1, 3, 2, 4}).contiguous();
    auto vpad = at::zeros({BH, M, DP}, q.options());
    vpad.narrow(2, 0, D).copy_(v);
    auto vp = vpad.view({BH, M / 2, 2, DP}).permute({0, 1, 3, 2}).contiguous();
    const auto *Q = q.data_ptr<at::BFloat16>(), *KP = kp.data_ptr<at::BFloat16>(), *VP = vp.data_ptr<at::BFloat16>();
    auto* O = out.data_ptr<at::BFloat16>();
    const int64_t tasks = BH * (N / QB);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> S(QB * KB), acc(QB * DP), mx(QB), sum(QB);
        std::vector<at::BFloat16> P(QB * KB);
        for (int64_t task = begin; task < end; ++task) {
            const int64_t bh = task / (N / QB), q0 = (task % (N / QB)) * QB;
            const at::BFloat16* q_ = Q + (bh * N + q0) * D;
            const at::BFloat16* kp_ = KP + bh * D * M;
            const at::BFloat16* vp_ = VP + bh * M * DP;
            std::fill(acc.begin(), acc.end(), 0.f);
            std::fill(mx.begin(), mx.end(), -INFINITY);
            std::fill(sum.begin(), sum.end(), 0.f);
            for (int64_t j0 = 0; j0 < M; j0 += KB) {
#ifndef SKIP_QK
                for (int i = 0; i < QB; i += 4) {
                    for (int j = 0; j < KB; j += 64) {
                        __m512 c[4][4];
                        for (int a = 0; a < 4; ++a) for (int b = 0; b < 4; ++b) c[a][b] = _mm512_setzero_ps();
                        for (int p = 0; p < P2; ++p) {
                            const at::BFloat16* kr = kp_ + (j0 * P2 + p * KB + j) * 2;
                            __m512bh k0 = load_bh(kr), k1 = load_bh(kr + 32), k2 = load_bh(kr + 64), k3 = load_bh(kr + 96);
                            for (int a = 0; a < 4; ++a) {
                                __m512bh qa = bcast_pair(q_ + (i + a) * D + 2 * p);
                                c[a][0] = _mm512_dpbf16_ps(c[a][0], qa, k0);
                                c[a][1] = _mm512_dpbf16_ps(c[a][1], qa, k1);
                                c[a][2] = _mm512_dpbf16_ps(c[a][2], qa, k2);
                                c[a][3] = _mm512_dpbf16_ps(c[a][3], qa, k3);
                            }
                        }
                        for (int a = 0; a < 4; ++a) for (int b = 0; b < 4; ++b)
                            _mm512_storeu_ps(&S[(i + a) * KB + j + 16 * b], _mm512_mul_ps(c[a][b], _mm512_set1_ps(scale)));
                    }
                }
#endif
#ifndef SKIP_SM
                for (int i = 0; i < QB; ++i) {
                    float* s = &S[i * KB];
                    __m512 m = _mm512_set1_ps(-INFINITY);
                    for (int j = 0; j < KB; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
                    const float new_max = std::max(mx[i], _mm512_reduce_max_ps(m));
                    const float correction = std::exp2(mx[i] - new_max);
                    __m512 nm = _mm512_set1_ps(new_max), total = _mm512_setzero_ps();
                    for (int j = 0; j < KB; j += 32) {
                        __m512 e0 = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(s + j), nm));
                        __m512 e1 = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), nm));
                        __m512bh pb = _mm512_cvtne2ps_pbh(e1, e0);
                        total = _mm512_add_ps(total, _mm512_add_ps(e0, e1));
                        _mm512_storeu_si512(&P[i * KB + j], (__m512i)pb);
                    }
                    sum[i] = sum[i] * correction + _mm512_reduce_add_ps(total);
                    mx[i] = new_max;
                    float* o = &acc[i * DP];
                    __m512 cv = _mm512_set1_ps(correction);
                    for (int d = 0; d < DP; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), cv));
                }
#endif
#ifndef SKIP_PV
                for (int i = 0; i < QB; i += 4) {
                    __m512 c[4][3];
                    for (int a = 0; a < 4; ++a) for (int b = 0; b < 3; ++b) c[a][b] = _mm512_loadu_ps(&acc[(i + a) * DP + 16 * b]);
                    for (int t = 0; t < KB / 2; ++t) {
                        const at::BFloat16* vr = vp_ + ((j0 / 2 + t) * DP) * 2;
                        __m512bh v0 = load_bh(vr), v1 = load_bh(vr + 32), v2 = load_bh(vr + 64);
                        for (int a = 0; a < 4; ++a) {
                            __m512bh pa = bcast_pair(&P[(i + a) * KB + 2 * t]);
                            c[a][0] = _mm512_dpbf16_ps(c[a][0], pa, v0);
                            c[a][1] = _mm512_dpbf16_ps(c[a][1], pa, v1);
                            c[a][2] = _mm512_dpbf16_ps(c[a][2], pa, v2);
                        }
                    }
                    for (int a = 0; a < 4; ++a) for (int b = 0; b < 3; ++b) _mm512_storeu_ps(&acc[(i + a) * DP + 16 * b], c[a][b]);
                }
#endif
            }
            for (int i = 0; i < QB; ++i) {
                at::BFloat16* o = O + (bh * N + q0 + i) * D;
                const float inv = 1.0f / sum[i];
                for (int d = 0; d < D; ++d) o[d] = at::BFloat16(acc[i * DP + d] * inv);
            }
        }
    });
    return out.view({B, H, N, D});
}

// OP: the op's name, so that bench/attention_kernel.py can load variants beside the real one
#ifndef OP
#define OP attention_bf16
#endif
#define NAME_(x) #x
#define NAME(x) NAME_(x)
TORCH_LIBRARY_FRAGMENT(sdcore, m) { m.def(NAME(OP) "(Tensor q, Tensor k, Tensor v) -> Tensor"); }
TORCH_LIBRARY_IMPL(sdcore, CPU, m) { m.impl(NAME(OP), &attention); }
