// deadwatch's fused statistics pass for CPU outputs (fused.py builds and calls it): what stats.record()
// folds for one output, in one read of it instead of a handful of torch ops, each of which costs
// microseconds of dispatch next to the few it spends reading a small map.
//
// The output is seen as (lead, units, trail) with any strides: lead rows are the dims before the unit
// axis (batch first), trail the dims after it. For each unit: the max over every value (padding at the
// dtype's lowest; NaN if any value is NaN), and over the first `counted` lead rows, the number of values
// above the threshold, the sum of |value| and, at bounded sites, the number near a bound. A NaN counts as
// neither fired nor near (torch.sign(NaN) is 0 on the CPU) and makes the sum NaN. Comparisons are made as the eager
// ops make them: on `value - limit` rounded to the output's dtype, with the limits (threshold, middle,
// reach) already rounded to it by the caller. Sums are taken in double.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

float bf16_load(uint16_t h) {
    uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

float bf16_round(float f) {  // to the nearest bfloat16, ties to even, as c10::BFloat16 rounds
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return f;  // NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    bits &= 0xffff0000u;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

template <typename T> struct Kind;  // how a stored value is read, rounded and written back
template <> struct Kind<float> {
    using W = float;
    static W load(const float* p) { return *p; }
    static W round(W v) { return v; }
    static void store(float* p, W v) { *p = v; }
};
template <> struct Kind<double> {
    using W = double;
    static W load(const double* p) { return *p; }
    static W round(W v) { return v; }
    static void store(double* p, W v) { *p = v; }
};
template <> struct Kind<uint16_t> {  // bfloat16
    using W = float;
    static W load(const uint16_t* p) { return bf16_load(*p); }
    static W round(W v) { return bf16_round(v); }
    static void store(uint16_t* p, W v) {  // v is a bfloat16 value (a max of them) or NaN
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        *p = std::isnan(v) ? uint16_t(0x7fc0) : uint16_t(bits >> 16);
    }
};

enum Flags { POSITIVE = 1, BOUNDED = 2, FIRST = 4 };

// L float32 lanes (GCC/Clang vector extensions): 8 where the build targets AVX (fused.py asks for it on a
// CPU that has AVX2), else 4 (SSE2 or NEON, which every 64-bit target has).
#ifdef __AVX__
constexpr int L = 8;
#else
constexpr int L = 4;
#endif
typedef float fv __attribute__((vector_size(4 * L)));
typedef int32_t iv __attribute__((vector_size(4 * L)));
typedef double dv __attribute__((vector_size(4 * L)));  // L / 2 doubles
#define INLINE static inline __attribute__((always_inline))

INLINE fv loadv(const float* p) { fv v; std::memcpy(&v, p, sizeof v); return v; }
INLINE fv splat(float v) { fv r; for (int k = 0; k < L; ++k) r[k] = v; return r; }
INLINE fv vmax(fv a, fv b) { return b > a ? b : a; }  // one max instruction; NaN is tracked apart
INLINE fv vabs(fv v) { return (fv)((iv)v & 0x7fffffff); }
INLINE dv low2(fv v) { dv d; for (int k = 0; k < L / 2; ++k) d[k] = double(v[k]); return d; }
INLINE dv high2(fv v) { dv d; for (int k = 0; k < L / 2; ++k) d[k] = double(v[L / 2 + k]); return d; }
INLINE int64_t lanes(iv v) { int64_t s = 0; for (int k = 0; k < L; ++k) s += v[k]; return s; }
INLINE double lanes(dv v) { double s = 0; for (int k = 0; k < L / 2; ++k) s += v[k]; return s; }
INLINE float top(fv v) { float t = v[0]; for (int k = 1; k < L; ++k) t = v[k] > t ? v[k] : t; return t; }

// The max of a contiguous run of float32 values (NaN: `bad` set).
INLINE float run_max(const float* p, int64_t len, int64_t& i, bool& bad) {
    fv m0 = splat(-std::numeric_limits<float>::infinity()), m1 = m0, m2 = m0, m3 = m0;
    iv b = iv{};
    for (; i + 4 * L <= len; i += 4 * L) {
        fv v0 = loadv(p + i), v1 = loadv(p + i + L), v2 = loadv(p + i + 2 * L), v3 = loadv(p + i + 3 * L);
        b |= ((v0 != v0) | (v1 != v1)) | ((v2 != v2) | (v3 != v3));
        m0 = vmax(m0, v0);
        m1 = vmax(m1, v1);
        m2 = vmax(m2, v2);
        m3 = vmax(m3, v3);
    }
    for (; i + L <= len; i += L) {
        fv v0 = loadv(p + i);
        b |= (v0 != v0);
        m0 = vmax(m0, v0);
    }
    bad = bad || lanes(b) != 0;
    return top(vmax(vmax(m0, m1), vmax(m2, m3)));
}

// The same, and the counts and |value| sum of the run.
template <bool POS, bool BND>
INLINE float run_count(const float* p, int64_t len, int64_t& i, bool& bad, float thr, float mid, float rch,
                       double& fired, double& magnitude, double& near) {
    fv m = splat(-std::numeric_limits<float>::infinity());
    iv b = iv{}, fc = iv{}, nc = iv{};
    dv s0 = dv{}, s1 = dv{};
    const fv tv = splat(thr), mv = splat(mid), rv = splat(rch);
    for (; i + L <= len; i += L) {
        fv v = loadv(p + i);
        b |= (v != v);
        m = vmax(m, v);
        fc -= (v > tv);  // a true lane is -1
        fv mag = POS ? v : vabs(v);
        s0 += low2(mag);
        s1 += high2(mag);
        if (BND) nc -= (vabs(v - mv) > rv);
    }
    bad = bad || lanes(b) != 0;
    fired += double(lanes(fc));
    magnitude += lanes(s0 + s1);  // a NaN lane makes it NaN, as one by one
    if (BND) near += double(lanes(nc));
    return top(m);
}

// BLOCK contiguous units of one lead row, over its trail positions (channels-last maps, where this measured
// faster than row by row on most widths: (16, 160, 24, 24) 167 against 190 us): the per-unit max (padding at
// `lowest`), NaN flags and, when counted, the sums, in registers.
constexpr int BLOCK = 4 * L;
template <bool COUNT, bool POS, bool BND>
INLINE void block(const float* p, int64_t s_trail, int64_t trail, const uint8_t* kept, float lowest, float thr,
                  float mid, float rch, float* mx, int32_t* bad, int32_t* fired, double* magnitude, int32_t* near) {
    fv m[4], low = splat(lowest), tv = splat(thr), mv = splat(mid), rv = splat(rch);
    iv b[4] = {}, fc[4] = {}, nc[4] = {};
    dv s[8] = {};
    for (int k = 0; k < 4; ++k) m[k] = loadv(mx + L * k);
    for (int64_t t = 0; t < trail; ++t) {
        if (kept && !kept[t]) {
            for (int k = 0; k < 4; ++k) m[k] = vmax(m[k], low);
            continue;
        }
        const float* q = p + t * s_trail;
        for (int k = 0; k < 4; ++k) {
            fv v = loadv(q + L * k);
            b[k] |= (v != v);
            m[k] = vmax(m[k], v);
            if (COUNT) {
                fc[k] -= (v > tv);
                fv mag = POS ? v : vabs(v);
                s[2 * k] += low2(mag);
                s[2 * k + 1] += high2(mag);
                if (BND) nc[k] -= (vabs(v - mv) > rv);
            }
        }
    }
    for (int k = 0; k < 4; ++k) {
        std::memcpy(mx + L * k, &m[k], sizeof m[k]);
        for (int j = 0; j < L; ++j) {
            bad[L * k + j] |= b[k][j];
            if (COUNT) {
                fired[L * k + j] += fc[k][j];
                if (BND) near[L * k + j] += nc[k][j];
                magnitude[L * k + j] += j < L / 2 ? s[2 * k][j] : s[2 * k + 1][j - L / 2];
            }
        }
    }
}

// One row of contiguous units (trail 1: (batch, units), tokens), in memory order, into the per-unit figures in
// L1-sized arrays: reading the rows in order is faster than running blocks of units down them (4 KB apart for
// 1024 units). A NaN anywhere in the row is looked for lane by lane afterwards (rows with one are rare).
template <bool COUNT, bool POS, bool BND>
INLINE int64_t row(const float* p, int64_t units, float thr, float mid, float rch, float* mx, int32_t* bad,
                   int32_t* fired, double* magnitude, int32_t* near) {
    const fv tv = splat(thr), mv = splat(mid), rv = splat(rch);
    iv b = iv{};
    int64_t u = 0;
    for (; u + L <= units; u += L) {
        fv v = loadv(p + u);
        b |= (v != v);
        fv m = loadv(mx + u);
        m = vmax(m, v);
        std::memcpy(mx + u, &m, sizeof m);
        if (COUNT) {
            iv f;
            std::memcpy(&f, fired + u, sizeof f);
            f -= (v > tv);
            std::memcpy(fired + u, &f, sizeof f);
            fv mag = POS ? v : vabs(v);
            dv lo, hi;
            std::memcpy(&lo, magnitude + u, sizeof lo);
            std::memcpy(&hi, magnitude + u + L / 2, sizeof hi);
            lo += low2(mag);
            hi += high2(mag);
            std::memcpy(magnitude + u, &lo, sizeof lo);
            std::memcpy(magnitude + u + L / 2, &hi, sizeof hi);
            if (BND) {
                iv n;
                std::memcpy(&n, near + u, sizeof n);
                n -= (vabs(v - mv) > rv);
                std::memcpy(near + u, &n, sizeof n);
            }
        }
    }
    if (lanes(b) != 0)
        for (int64_t k = 0; k < u; ++k) bad[k] |= p[k] != p[k];
    return u;
}

// Per-unit running figures of one call.
template <typename W> struct Figures {
    std::vector<W> mx;
    std::vector<uint8_t> nan;
    std::vector<double> f, a, n;
    explicit Figures(int64_t units)
        : mx(units, -std::numeric_limits<W>::infinity()), nan(units, 0), f(units, 0.0), a(units, 0.0), n(units, 0.0) {}
};

template <typename T>
void fold(const T* x, int64_t lead, int64_t units, int64_t trail, int64_t s_lead, int64_t s_unit, int64_t s_trail,
          int64_t counted, const uint8_t* keep, T* step_max, double* fired, double* magnitude, double* near,
          double threshold, double middle, double reach, int flags) {
    using K = Kind<T>;
    using W = typename K::W;
    constexpr bool vector = std::is_same<T, float>::value;  // float32: eight lanes at a time where contiguous
    const W lowest = std::numeric_limits<W>::lowest();
    const W thr = W(threshold), mid = W(middle), rch = W(reach);
    const bool positive = flags & POSITIVE, bounded = flags & BOUNDED;
    Figures<W> fig(units);
    W* mx = fig.mx.data();
    uint8_t* nan = fig.nan.data();
    double *f = fig.f.data(), *a = fig.a.data(), *n = fig.n.data();
    // One value of unit u: into the max, and when counted into the sums.
    auto take = [&](int64_t u, W v, bool count) {
        if (v != v) {
            nan[u] = 1;
            if (count) a[u] = std::numeric_limits<double>::quiet_NaN();
            return;
        }
        if (v > mx[u]) mx[u] = v;
        if (!count) return;
        f[u] += (v > thr) ? 1.0 : 0.0;  // the sign of round(v - thr) is the sign of v - thr
        a[u] += positive ? double(v) : std::fabs(double(v));
        if (bounded) n[u] += (std::fabs(K::round(v - mid)) > rch) ? 1.0 : 0.0;
    };
    // A contiguous run of one unit's values (float32): four lanes at a time, then the rest one by one.
    auto run = [&](int64_t u, const float* p, int64_t len, bool count) {
        int64_t i = 0;
        bool bad = false;
        float top = -std::numeric_limits<float>::infinity();
        if (!count) {
            top = run_max(p, len, i, bad);
        } else {
            const float t = float(thr), m = float(mid), r = float(rch);
            if (positive && bounded) top = run_count<true, true>(p, len, i, bad, t, m, r, f[u], a[u], n[u]);
            else if (positive) top = run_count<true, false>(p, len, i, bad, t, m, r, f[u], a[u], n[u]);
            else if (bounded) top = run_count<false, true>(p, len, i, bad, t, m, r, f[u], a[u], n[u]);
            else top = run_count<false, false>(p, len, i, bad, t, m, r, f[u], a[u], n[u]);
        }
        if (top > mx[u]) mx[u] = W(top);
        if (bad) nan[u] = 1;
        for (; i < len; ++i) take(u, W(p[i]), count);
    };
    const bool units_inner = s_unit <= s_trail || trail == 1;
    std::vector<int32_t> bad_u, fc_u, nc_u;  // per unit, for the units-inner float32 loop
    if (vector && units_inner && s_unit == 1) {
        bad_u.assign(units, 0);
        fc_u.assign(units, 0);
        nc_u.assign(units, 0);
    }
    // BLOCK units at a time from `base` on, over `len` positions `stride` apart, in registers (float32 only).
    auto blocks = [&](const float* base, int64_t stride, int64_t len, const uint8_t* kept, bool count) {
        int32_t *bu = bad_u.data(), *fu = fc_u.data(), *nu = nc_u.data();
        const float t = float(thr), m = float(mid), c = float(rch), lo = float(lowest);
        int64_t u = 0;
        for (; u + BLOCK <= units; u += BLOCK) {
            const float* p = base + u;
            float* mu = reinterpret_cast<float*>(mx) + u;
            if (!count) block<false, false, false>(p, stride, len, kept, lo, t, m, c, mu, bu + u, fu + u, a + u, nu + u);
            else if (positive && bounded) block<true, true, true>(p, stride, len, kept, lo, t, m, c, mu, bu + u, fu + u, a + u, nu + u);
            else if (positive) block<true, true, false>(p, stride, len, kept, lo, t, m, c, mu, bu + u, fu + u, a + u, nu + u);
            else if (bounded) block<true, false, true>(p, stride, len, kept, lo, t, m, c, mu, bu + u, fu + u, a + u, nu + u);
            else block<true, false, false>(p, stride, len, kept, lo, t, m, c, mu, bu + u, fu + u, a + u, nu + u);
        }
        return u;
    };
    if (vector && s_unit == 1 && trail == 1) {  // tokens, (batch, units): row by row, in memory order
        float* mf = reinterpret_cast<float*>(mx);
        int32_t *bu = bad_u.data(), *fu = fc_u.data(), *nu = nc_u.data();
        const float t = float(thr), m = float(mid), c = float(rch);
        for (int64_t r = 0; r < lead; ++r) {
            if (keep && !keep[r]) {  // padding: the lowest value for the max, nothing counted
                for (int64_t v = 0; v < units; ++v) if (lowest > mx[v]) mx[v] = lowest;
                continue;
            }
            const float* p = reinterpret_cast<const float*>(x + r * s_lead);
            int64_t u;
            if (r >= counted) u = row<false, false, false>(p, units, t, m, c, mf, bu, fu, a, nu);
            else if (positive && bounded) u = row<true, true, true>(p, units, t, m, c, mf, bu, fu, a, nu);
            else if (positive) u = row<true, true, false>(p, units, t, m, c, mf, bu, fu, a, nu);
            else if (bounded) u = row<true, false, true>(p, units, t, m, c, mf, bu, fu, a, nu);
            else u = row<true, false, false>(p, units, t, m, c, mf, bu, fu, a, nu);
            for (int64_t v = u; v < units; ++v) take(v, K::load(x + r * s_lead + v), r < counted);  // the units left
        }
    } else {
        for (int64_t r = 0; r < lead; ++r) {
            const bool count = r < counted;
            const T* row = x + r * s_lead;
            const uint8_t* kept = keep ? keep + r * trail : nullptr;
            if (units_inner) {
                int64_t u = 0;
                if (vector && s_unit == 1) u = blocks(reinterpret_cast<const float*>(row), s_trail, trail, kept, count);
                for (int64_t t = 0; t < trail && u < units; ++t) {  // the units left, one by one
                    const T* p = row + t * s_trail;
                    if (kept && !kept[t]) {  // padding: the lowest value for the max, nothing counted
                        for (int64_t v = u; v < units; ++v) if (lowest > mx[v]) mx[v] = lowest;
                        continue;
                    }
                    for (int64_t v = u; v < units; ++v) take(v, K::load(p + v * s_unit), count);
                }
            } else {
                for (int64_t u = 0; u < units; ++u) {
                    const T* p = row + u * s_unit;
                    if constexpr (vector) {
                        if (!kept && s_trail == 1) {
                            run(u, p, trail, count);
                            continue;
                        }
                    }
                    for (int64_t t = 0; t < trail; ++t) {
                        if (kept && !kept[t]) {
                            if (lowest > mx[u]) mx[u] = lowest;
                            continue;
                        }
                        take(u, K::load(p + t * s_trail), count);
                    }
                }
            }
        }
    }
    for (int64_t u = 0; u < int64_t(bad_u.size()); ++u) {  // the units-inner loop's counts (a NaN fires never)
        nan[u] |= bad_u[u] != 0;
        f[u] += fc_u[u];
        n[u] += nc_u[u];
    }
    for (int64_t u = 0; u < units; ++u) {
        W m = nan[u] ? std::numeric_limits<W>::quiet_NaN() : mx[u];
        if (flags & FIRST) {
            K::store(step_max + u, m);
            fired[u] = f[u];
            magnitude[u] = a[u];
            if (bounded) near[u] = n[u];
        } else {
            W old = K::load(step_max + u);
            K::store(step_max + u, (old != old || m != m) ? std::numeric_limits<W>::quiet_NaN() : (m > old ? m : old));
            fired[u] += f[u];
            magnitude[u] += a[u];
            if (bounded) near[u] += n[u];
        }
    }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float64, 2 bfloat16. Returns 0, or 1 for a dtype it does not know.
int deadwatch_fold(int dtype, const void* x, int64_t lead, int64_t units, int64_t trail, int64_t s_lead,
                   int64_t s_unit, int64_t s_trail, int64_t counted, const uint8_t* keep, void* step_max,
                   double* fired, double* magnitude, double* near, double threshold, double middle, double reach,
                   int flags) {
    switch (dtype) {
        case 0:
            fold(static_cast<const float*>(x), lead, units, trail, s_lead, s_unit, s_trail, counted, keep,
                 static_cast<float*>(step_max), fired, magnitude, near, threshold, middle, reach, flags);
            return 0;
        case 1:
            fold(static_cast<const double*>(x), lead, units, trail, s_lead, s_unit, s_trail, counted, keep,
                 static_cast<double*>(step_max), fired, magnitude, near, threshold, middle, reach, flags);
            return 0;
        case 2:
            fold(static_cast<const uint16_t*>(x), lead, units, trail, s_lead, s_unit, s_trail, counted, keep,
                 static_cast<uint16_t*>(step_max), fired, magnitude, near, threshold, middle, reach, flags);
            return 0;
        default:
            return 1;
    }
}

}
