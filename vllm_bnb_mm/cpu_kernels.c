/* Byte moves for bitsandbytes' AVX512-BF16 4-bit CPU layout (vllm_bnb_mm/cpu.py builds this).
 *
 * bitsandbytes' plain 4-bit layout of an [N, K] weight is row-major, two values per byte,
 * the first in the high nibble. Its CPU kernel layout ("packing_format_for_cpu") stores,
 * for each block of 32 rows nb and each column pair kp, 32 bytes: byte 2j + c holds
 * W[32 nb + j, 2 kp + c] in its low nibble and W[32 nb + 16 + j, 2 kp + c] in its high
 * nibble (j < 16, c < 2). Its block scales are bf16, [K / blocksize, N].
 *
 * bitsandbytes has fast code for plain -> kernel layout only in its fused matmul, and none
 * for kernel layout -> values; these two routines fill those gaps without changing any
 * value: `repack` is the permutation bitsandbytes' _convert_weight_packed_for_cpu applies,
 * `dequantize_t` computes bf16(code[q] * scale) exactly as bitsandbytes' CPU
 * dequantize_4bit does (float32 product, round to nearest even).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* plain [N, K/2] bytes -> kernel [N/32][K/2][32] bytes (distinct buffers). */
void repack(const uint8_t *plain, uint8_t *kernel, int64_t n, int64_t k) {
    const int64_t row = k / 2;
    for (int64_t nb = 0; nb < n / 32; ++nb) {
        const uint8_t *lo_rows = plain + nb * 32 * row, *hi_rows = lo_rows + 16 * row;
        uint8_t *tile = kernel + nb * 32 * row;
        for (int64_t kp = 0; kp < row; ++kp, tile += 32) {
            for (int j = 0; j < 16; ++j) {
                const uint8_t a = lo_rows[j * row + kp], b = hi_rows[j * row + kp];
                tile[2 * j] = (uint8_t)((b & 0xF0) | (a >> 4));
                tile[2 * j + 1] = (uint8_t)((b << 4) | (a & 0x0F));
            }
        }
    }
}

/* The same permutation in place: block nb of the kernel layout occupies exactly the bytes
 * of plain rows [32 nb, 32 nb + 32), so each block is copied to `tmp` (32 * k / 2 bytes)
 * and permuted back. No second weight-sized buffer, no fresh pages to fault in. */
void repack_inplace(uint8_t *buf, uint8_t *tmp, int64_t n, int64_t k) {
    const int64_t block = 32 * (k / 2);
    for (int64_t nb = 0; nb < n / 32; ++nb) {
        memcpy(tmp, buf + nb * block, (size_t)block);
        repack(tmp, buf + nb * block, 32, k);
    }
}

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Columns [32 nb0, 32 nb1) of W^T, as bf16 [K][32 (nb1 - nb0)], from the kernel layout.
 * W^T because a column pair of 32 rows is 2 x 64 contiguous bytes of it. */
void dequantize_t(const uint8_t *kernel, const uint16_t *scales, const float *code,
                  uint16_t *out, int64_t n, int64_t k, int64_t blocksize, int64_t nb0,
                  int64_t nb1) {
    const __m512 lut = _mm512_loadu_ps(code);
    const __m512i nibble = _mm512_set1_epi32(0xF);
    const int64_t ld = (nb1 - nb0) * 32;
    for (int64_t kp = 0; kp < k / 2; ++kp) {
        const uint16_t *s = scales + (2 * kp / blocksize) * n;
        uint16_t *even = out + 2 * kp * ld, *odd = even + ld;
        for (int64_t nb = nb0; nb < nb1; ++nb, even += 32, odd += 32) {
            const __m512 s_lo = bf16x16_to_f32(s + nb * 32);
            const __m512 s_hi = bf16x16_to_f32(s + nb * 32 + 16);
            /* 16 lanes, lane j = bytes 2j, 2j + 1 of the tile: 4 nibbles. */
            const __m512i q = _mm512_cvtepu16_epi32(
                _mm256_loadu_si256((const __m256i *)(kernel + (nb * (k / 2) + kp) * 32)));
            const __m512 e_lo = _mm512_permutexvar_ps(_mm512_and_si512(q, nibble), lut);
            const __m512 e_hi = _mm512_permutexvar_ps(
                _mm512_and_si512(_mm512_srli_epi32(q, 4), nibble), lut);
            const __m512 o_lo = _mm512_permutexvar_ps(
                _mm512_and_si512(_mm512_srli_epi32(q, 8), nibble), lut);
            const __m512 o_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 12), lut);
            _mm512_storeu_si512(even, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(e_hi, s_hi),
                                                                   _mm512_mul_ps(e_lo, s_lo)));
            _mm512_storeu_si512(odd, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(o_hi, s_hi),
                                                                  _mm512_mul_ps(o_lo, s_lo)));
        }
    }
}
