/* Philox4x32-10 uniforms for kernels/noise.py's CPU `randn`, compiled at first use by kernels/native.py.
 *
 * Bit-for-bit the generator of kernels/noise.py (itself Triton's philox_impl + uint_to_uniform_float):
 * counter (index % groups, sample_ids[index / groups], stream, 0), key (k0, k1); each of the four
 * 32-bit outputs becomes a float32 uniform: bitcast to int32, negatives folded with x ^ (x >> 31), converted
 * (round to nearest) and multiplied by UNIFORM_SCALE in float32. Output l of counter index i goes to
 * out[l * n + (i - start)], four planes, so torch's Box-Muller reads contiguous lanes.
 * Integer ops only up to the one float conversion and multiply (no contraction: -ffp-contract=off), so the
 * bits do not depend on the compiler or the vector width. The loop is plain C that gcc/clang vectorise;
 * target_clones adds an AVX2 version picked at load time.
 */
#include <stdint.h>

#define ROUND_A 0xD2511F53u
#define ROUND_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u
#define UNIFORM_SCALE 4.6566127342e-10f

static inline float to_uniform(uint32_t word) {
    int32_t s = (int32_t)word;
    s ^= s >> 31; /* arithmetic shift: ~s for negatives, as Triton's uint_to_uniform_float */
    return (float)s * UNIFORM_SCALE;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void philox_uniforms(const uint32_t *sample_ids, int64_t groups, int64_t start, int64_t stop, uint32_t stream,
                     uint32_t key0, uint32_t key1, float *out) {
    const int64_t n = stop - start;
    for (int64_t row = start / groups; row * groups < stop; ++row) {  /* row by row: no division per element */
        const int64_t first = row * groups > start ? row * groups : start;
        const int64_t last = (row + 1) * groups < stop ? (row + 1) * groups : stop;
        const uint32_t sample_id = sample_ids[row];
        for (int64_t i = first; i < last; ++i) {
            uint32_t c0 = (uint32_t)(i - row * groups), c1 = sample_id, c2 = stream, c3 = 0;
            uint32_t k0 = key0, k1 = key1;
            for (int round = 0; round < 10; ++round) {
                const uint64_t prod_b = (uint64_t)ROUND_B * c2, prod_a = (uint64_t)ROUND_A * c0;
                c0 = (uint32_t)(prod_b >> 32) ^ c1 ^ k0;
                c2 = (uint32_t)(prod_a >> 32) ^ c3 ^ k1;
                c1 = (uint32_t)prod_b;
                c3 = (uint32_t)prod_a;
                k0 += KEY_A;
                k1 += KEY_B;
            }
            const int64_t j = i - start;
            out[j] = to_uniform(c0);
            out[n + j] = to_uniform(c1);
            out[2 * n + j] = to_uniform(c2);
            out[3 * n + j] = to_uniform(c3);
        }
    }
}
