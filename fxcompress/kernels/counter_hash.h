/* counter_hash.py's finaliser in C: the one counter-based random stream of
 * the stochastic kernels (same constants, uint32 arithmetic wraps mod 2^32
 * as the torch reference's masking does). */
#ifndef FXC_COUNTER_HASH_H
#define FXC_COUNTER_HASH_H
#include <stdint.h>

static inline uint32_t fxc_mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 16;
    return h;
}

/* the top 24 bits as u in [0, 1), exact in float32 */
static inline float fxc_u24(uint32_t h) { return (float)(h >> 8) * (1.0f / 16777216.0f); }

#endif
