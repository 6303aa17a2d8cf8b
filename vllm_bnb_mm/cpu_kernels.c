/* Byte moves for bitsandbytes' AVX512-BF16 4-bit CPU layout (vllm_bnb_mm/cpu.py builds this).
 *
 * bitsandbytes' plain 4-bit layout of an [N, K] weight is row-major, two values per byte,
 * the first in the high nibble. Its CPU kernel layout ("packing_format_for_cpu") stores,
 * for each block of 32 rows nb and each column pair kp, 32 bytes: byte 2j + c holds
 * W[32 nb + j, 2 kp + c] in its low nibble and W[32 nb + 16 + j, 2 kp + c] in its high
 * nibble (j < 16, c < 2). Its block scales are bf16, [K / blocksize, N].
 *
 * bitsandbytes has fast code for plain -> kernel layout only in its fused matmul, and none
 * for kernel layout -> values; these routines fill those gaps without changing any value:
 * `repack` is the permutation bitsandbytes' _convert_weight_packed_for_cpu applies,
 * `dequantize_t` computes bf16(code[q] * scale) exactly as bitsandbytes' CPU
 * dequantize_4bit does (float32 product, round to nearest even). The two GEMMs decode each
 * weight once per call where bitsandbytes' fused kernel decodes it again for every 4 rows
 * of x; with few rows they compute what that kernel computes (bf16 code values, each
 * quantization block's float32 sums times its scale).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Column pairs [kp0, kp1) of one 32-row block, byte by byte: byte 2j of pair kp takes
 * the high nibbles of plain rows 16 + j and j (their column 2 kp) as its high and low
 * nibble, byte 2j + 1 their low nibbles (column 2 kp + 1). */
static void repack_cols(const uint8_t *lo_rows, const uint8_t *hi_rows, int64_t row,
                        uint8_t *tile, int64_t kp0, int64_t kp1) {
    for (int64_t kp = kp0; kp < kp1; ++kp) {
        for (int j = 0; j < 16; ++j) {
            const uint8_t a = lo_rows[j * row + kp], b = hi_rows[j * row + kp];
            tile[32 * kp + 2 * j] = (uint8_t)((b & 0xF0) | (a >> 4));
            tile[32 * kp + 2 * j + 1] = (uint8_t)((b << 4) | (a & 0x0F));
        }
    }
}

/* Word indices of the transpose below: round r merges two registers that hold 2^r rows j
 * each, [kp][j] word order, into two that hold 2^(r + 1) rows and half the column pairs
 * each (h = 0: the first half). */
static void transpose_indices(__m512i idx[4][2]) {
    uint16_t words[32] __attribute__((aligned(64)));
    for (int r = 0; r < 4; ++r) {
        const int g = 1 << r, half = 16 >> r;
        for (int h = 0; h < 2; ++h) {
            for (int o = 0; o < 32; ++o) {
                const int kp = o / (2 * g) + h * half, jj = o % (2 * g);
                words[o] = (uint16_t)(jj < g ? kp * g + jj : 32 + kp * g + jj - g);
            }
            idx[r][h] = _mm512_load_si512((const __m512i *)words);
        }
    }
}

/* `repack_cols` for 32 column pairs at once: the 16 x 32 words (byte 2j | byte 2j + 1 << 8)
 * of rows j are built in 16 registers and transposed to [kp][j] by four rounds of pairwise
 * word permutes (the byte-at-a-time loop ran at ~1 GB/s, the largest cost of loading). */
static inline void repack_32_cols(const uint8_t *lo_rows, const uint8_t *hi_rows, int64_t row,
                                  uint8_t *out, const __m512i idx[4][2]) {
    const __m256i low = _mm256_set1_epi8(0x0F), high = _mm256_set1_epi8((char)0xF0);
    __m512i v[16], t[16];
    for (int j = 0; j < 16; ++j) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(lo_rows + j * row));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(hi_rows + j * row));
        const __m256i even = _mm256_or_si256(_mm256_and_si256(b, high),
                                             _mm256_and_si256(_mm256_srli_epi16(a, 4), low));
        const __m256i odd = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(b, 4), high),
                                            _mm256_and_si256(a, low));
        v[j] = _mm512_or_si512(_mm512_cvtepu8_epi16(even),
                               _mm512_slli_epi16(_mm512_cvtepu8_epi16(odd), 8));
    }
    for (int r = 0; r < 4; ++r) {
        const int groups = 1 << r; /* column groups per row group before this round */
        for (int jg = 0; jg < (8 >> r); ++jg) {
            for (int c = 0; c < groups; ++c) {
                const __m512i a = v[2 * jg * groups + c], b = v[(2 * jg + 1) * groups + c];
                t[2 * (jg * groups + c)] = _mm512_permutex2var_epi16(a, idx[r][0], b);
                t[2 * (jg * groups + c) + 1] = _mm512_permutex2var_epi16(a, idx[r][1], b);
            }
        }
        memcpy(v, t, sizeof v);
    }
    for (int c = 0; c < 16; ++c) _mm512_storeu_si512((__m512i *)(out + 64 * c), v[c]);
}

static void repack_blocks(const uint8_t *plain, uint8_t *kernel, int64_t n, int64_t k,
                          const __m512i idx[4][2]) {
    const int64_t row = k / 2, vectors = row / 32 * 32;
    for (int64_t nb = 0; nb < n / 32; ++nb) {
        const uint8_t *lo_rows = plain + nb * 32 * row, *hi_rows = lo_rows + 16 * row;
        uint8_t *tile = kernel + nb * 32 * row;
        for (int64_t kp = 0; kp < vectors; kp += 32)
            repack_32_cols(lo_rows + kp, hi_rows + kp, row, tile + 32 * kp, idx);
        repack_cols(lo_rows, hi_rows, row, tile, vectors, row);
    }
}

/* plain [N, K/2] bytes -> kernel [N/32][K/2][32] bytes (distinct buffers). */
void repack(const uint8_t *plain, uint8_t *kernel, int64_t n, int64_t k) {
    __m512i idx[4][2];
    transpose_indices(idx);
    repack_blocks(plain, kernel, n, k, idx);
}

/* The same permutation in place: block nb of the kernel layout occupies exactly the bytes
 * of plain rows [32 nb, 32 nb + 32), so each block is copied to `tmp` (32 * k / 2 bytes)
 * and permuted back. No second weight-sized buffer, no fresh pages to fault in. */
void repack_inplace(uint8_t *buf, uint8_t *tmp, int64_t n, int64_t k) {
    const int64_t block = 32 * (k / 2);
    __m512i idx[4][2];
    transpose_indices(idx);
    for (int64_t nb = 0; nb < n / 32; ++nb) {
        memcpy(tmp, buf + nb * block, (size_t)block);
        repack_blocks(tmp, buf + nb * block, 32, k, idx);
    }
}

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* The 32 bytes of one column pair kp of a 32-row block, as float32 code values: lane j of
 * `even` / `odd` is column 2 kp / 2 kp + 1 of rows j (`*_lo`) and 16 + j (`*_hi`). */
struct pair_values {
    __m512 even_lo, even_hi, odd_lo, odd_hi;
};

static inline struct pair_values decode_pair(const uint8_t *src, __m512 lut) {
    const __m512i nibble = _mm512_set1_epi32(0xF);
    /* 16 lanes, lane j = bytes 2j, 2j + 1: 4 nibbles. */
    const __m512i q = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    struct pair_values v;
    v.even_lo = _mm512_permutexvar_ps(_mm512_and_si512(q, nibble), lut);
    v.even_hi = _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srli_epi32(q, 4), nibble), lut);
    v.odd_lo = _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srli_epi32(q, 8), nibble), lut);
    v.odd_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 12), lut);
    return v;
}

/* Columns [32 nb0, 32 nb1) of W^T, as bf16 [K][32 (nb1 - nb0)], from the kernel layout.
 * W^T because a column pair of 32 rows is 2 x 64 contiguous bytes of it. */
void dequantize_t(const uint8_t *kernel, const uint16_t *scales, const float *code,
                  uint16_t *out, int64_t n, int64_t k, int64_t blocksize, int64_t nb0,
                  int64_t nb1) {
    const __m512 lut = _mm512_loadu_ps(code);
    const int64_t ld = (nb1 - nb0) * 32;
    for (int64_t kp = 0; kp < k / 2; ++kp) {
        const uint16_t *s = scales + (2 * kp / blocksize) * n;
        uint16_t *even = out + 2 * kp * ld, *odd = even + ld;
        for (int64_t nb = nb0; nb < nb1; ++nb, even += 32, odd += 32) {
            const __m512 s_lo = bf16x16_to_f32(s + nb * 32);
            const __m512 s_hi = bf16x16_to_f32(s + nb * 32 + 16);
            const struct pair_values v = decode_pair(kernel + (nb * (k / 2) + kp) * 32, lut);
            _mm512_storeu_si512(even, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(v.even_hi, s_hi),
                                                                   _mm512_mul_ps(v.even_lo, s_lo)));
            _mm512_storeu_si512(odd, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(v.odd_hi, s_hi),
                                                                  _mm512_mul_ps(v.odd_lo, s_lo)));
        }
    }
}

/* ------------------------------------------------------------------ 4-bit pieces
 *
 * Both GEMMs below decode each 32 x 32 piece of W into the VNNI layout AMX's B tiles use
 * (row r: 16 columns n, each the pair W[n, 2r], W[n, 2r + 1]), which is also what
 * AVX512-BF16's VDPBF16PS takes: one B tile row against a broadcast pair of x is 16
 * outputs' two-term dot product. */

/* Columns 32 kt .. 32 kt + 31 of rows 32 nb .. 32 nb + 31 into two B tiles (512 bf16
 * each: rows n < 16, then rows n >= 16) as bf16(code[q] * scale), the dequantized weight
 * (the AMX kernel's many-row path). Byte 2j + c of a column pair holds column c of rows j
 * (low nibble) and 16 + j (high nibble): in byte order, the nibbles already are a B tile
 * row in VNNI order (16 rows n, each the pair c = 0, 1), so each byte is widened to one
 * float32 lane and the scales are spread to match (lane 2j + c: row j's scale). */
static inline void decode_piece(const uint8_t *src, const uint16_t *s, __m512 lut,
                                uint16_t *b) {
    const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    const __m512 s_lo = bf16x16_to_f32(s), s_hi = bf16x16_to_f32(s + 16);
    const __m512 lo0 = _mm512_permutexvar_ps(first, s_lo);
    const __m512 lo1 = _mm512_permutexvar_ps(second, s_lo);
    const __m512 hi0 = _mm512_permutexvar_ps(first, s_hi);
    const __m512 hi1 = _mm512_permutexvar_ps(second, s_hi);
    const __m512i nibble = _mm512_set1_epi32(0xF);
    for (int r = 0; r < 16; ++r, src += 32) {
        const __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
        const __m512i q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + 16)));
        const __m512 w0 = _mm512_permutexvar_ps(_mm512_and_si512(q0, nibble), lut);
        const __m512 w1 = _mm512_permutexvar_ps(_mm512_and_si512(q1, nibble), lut);
        const __m512 v0 = _mm512_permutexvar_ps(_mm512_srli_epi32(q0, 4), lut);
        const __m512 v1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q1, 4), lut);
        _mm512_store_si512(b + 32 * r, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(w1, lo1),
                                                                   _mm512_mul_ps(w0, lo0)));
        _mm512_store_si512(b + 512 + 32 * r, (__m512i)_mm512_cvtne2ps_pbh(
                                                 _mm512_mul_ps(v1, hi1), _mm512_mul_ps(v0, hi0)));
    }
}

/* bf16(code[q]) (round to nearest even) in 16-bit lanes 0-15, for _mm512_permutexvar_epi16. */
static inline __m512i bf16_code_table(const float *code) {
    return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(code)));
}

/* One row of a 32 x 32 piece as bf16 code values only, for the fused kernel's arithmetic
 * (the scales are applied to the block sums): byte i of the row's 32 bytes is lane i of
 * `low` (its low nibble: weight rows n < 16) and of `high` (high nibble: rows n >= 16).
 * One widen and two 16-bit table lookups per 64 weights. */
static inline void decode_row_codes(const uint8_t *src, __m512i table, __m512i *low,
                                    __m512i *high) {
    const __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
    *low = _mm512_permutexvar_epi16(_mm512_and_si512(q, _mm512_set1_epi16(0xF)), table);
    *high = _mm512_permutexvar_epi16(_mm512_srli_epi16(q, 4), table);
}

/* As decode_piece, but code values only: the piece's 16 rows into the two B tiles. */
static inline void decode_piece_codes(const uint8_t *src, __m512i table, uint16_t *b) {
    for (int r = 0; r < 16; ++r, src += 32) {
        __m512i low, high;
        decode_row_codes(src, table, &low, &high);
        _mm512_store_si512(b + 32 * r, low);
        _mm512_store_si512(b + 512 + 32 * r, high);
    }
}

/* ------------------------------------------------------------------ AVX512-BF16 GEMM
 *
 * out[M, N] (bf16) = x[M, K] (bf16) @ W^T straight from the kernel layout, for AVX512-BF16
 * CPUs without AMX (Zen 4/5, Cooper Lake), where bitsandbytes' fused kernel decodes the
 * weight again for every 4 rows of x. With the fused kernel's arithmetic (bf16 code values,
 * each block's float32 sums times its scale): each 32 x 32 piece of W is decoded into
 * registers in VDPBF16PS's operand order (decode_piece_codes' B tile rows) and used there at
 * once by up to 8 rows of x, whose float32 sums stay in registers. Storing decoded pieces to
 * reload them for more rows costs more than decoding again per 8 rows (Zen 4, one thread:
 * 1.1-1.6x the time of this at 9-512 rows; 1.5x the fused kernel's time at one row). */

#define PASS_ROWS 8   /* rows of x per pass over a block of W */
/* Blocks of W side by side in a single pass of 1-2 / 3-4 rows (one block from 5): 2 x rows
 * x blocks float32 sums, 16 of the 32 registers; with one or two rows, a single block's
 * sums would be one dependency chain of VDPBF16PS each. */
#define MAX_BLOCKS 4
#define BLOCKS_3_4_ROWS 2

static inline int64_t blocks_side_by_side(int64_t rows) {
    return rows <= 2 ? MAX_BLOCKS : rows <= 4 ? BLOCKS_3_4_ROWS : 1;
}

/* out rows [0, rows) (+ columns of blocks nb .. nb + nbs - 1) from x rows [0, rows). */
static inline __attribute__((always_inline)) void pass_avx512(
    const uint16_t *x, const uint8_t *kernel, const uint16_t *scales, __m512i table,
    uint16_t *out, int rows, int nbs, int64_t n, int64_t k, int64_t blocksize, int64_t nb) {
    __m512 sum[MAX_BLOCKS][PASS_ROWS][2], acc[MAX_BLOCKS][PASS_ROWS][2];
    for (int j = 0; j < nbs; ++j)
        for (int i = 0; i < rows; ++i)
            acc[j][i][0] = acc[j][i][1] = sum[j][i][0] = sum[j][i][1] = _mm512_setzero_ps();
    const int64_t pieces = k / 32, per_block = blocksize / 32;
    for (int64_t kt = 0; kt < pieces; ++kt) {
        for (int r = 0; r < 16; ++r) {
            __m512bh xv[PASS_ROWS];
            for (int i = 0; i < rows; ++i) {
                int32_t pair;
                memcpy(&pair, x + i * k + 32 * kt + 2 * r, sizeof pair);
                xv[i] = (__m512bh)_mm512_set1_epi32(pair);
            }
            for (int j = 0; j < nbs; ++j) {
                __m512i b_lo, b_hi;
                decode_row_codes(kernel + (nb + j) * (k / 2) * 32 + kt * 512 + 32 * r, table,
                                 &b_lo, &b_hi);
                for (int i = 0; i < rows; ++i) {
                    sum[j][i][0] = _mm512_dpbf16_ps(sum[j][i][0], xv[i], (__m512bh)b_lo);
                    sum[j][i][1] = _mm512_dpbf16_ps(sum[j][i][1], xv[i], (__m512bh)b_hi);
                }
            }
        }
        if (kt % per_block == per_block - 1 || kt == pieces - 1) {  /* a block's last piece */
            for (int j = 0; j < nbs; ++j) {
                const uint16_t *s = scales + (32 * kt / blocksize) * n + 32 * (nb + j);
                const __m512 s_lo = bf16x16_to_f32(s), s_hi = bf16x16_to_f32(s + 16);
                for (int i = 0; i < rows; ++i) {
                    acc[j][i][0] = _mm512_fmadd_ps(sum[j][i][0], s_lo, acc[j][i][0]);
                    acc[j][i][1] = _mm512_fmadd_ps(sum[j][i][1], s_hi, acc[j][i][1]);
                    sum[j][i][0] = sum[j][i][1] = _mm512_setzero_ps();
                }
            }
        }
    }
    for (int j = 0; j < nbs; ++j)
        for (int i = 0; i < rows; ++i)
            _mm512_storeu_si512(out + i * n + 32 * (nb + j),
                                (__m512i)_mm512_cvtne2ps_pbh(acc[j][i][1], acc[j][i][0]));
}

/* pass_avx512 with the counts as constants, so the sums stay in registers: `wide` =
 * blocks_side_by_side(rows) blocks from nb, else one. */
static void pass_of(const uint16_t *x, const uint8_t *kernel, const uint16_t *scales,
                    __m512i table, uint16_t *out, int rows, int wide, int64_t n, int64_t k,
                    int64_t blocksize, int64_t nb) {
#define PASS(R, B) pass_avx512(x, kernel, scales, table, out, R, B, n, k, blocksize, nb)
    switch (rows) {
    case 1: if (wide) PASS(1, MAX_BLOCKS); else PASS(1, 1); break;
    case 2: if (wide) PASS(2, MAX_BLOCKS); else PASS(2, 1); break;
    case 3: if (wide) PASS(3, BLOCKS_3_4_ROWS); else PASS(3, 1); break;
    case 4: if (wide) PASS(4, BLOCKS_3_4_ROWS); else PASS(4, 1); break;
    case 5: PASS(5, 1); break;
    case 6: PASS(6, 1); break;
    case 7: PASS(7, 1); break;
    default: PASS(8, 1); break;
    }
#undef PASS
}

/* Groups of blocks of 32 rows of W split over the OpenMP threads (torch's runtime, as for
 * AMX); for each, passes of at most PASS_ROWS rows of x, evenly split (9 rows: 5 + 4). */
void gemm_4bit_avx512(const uint16_t *x, const uint8_t *kernel, const uint16_t *scales,
                      const float *code, uint16_t *out, int64_t m, int64_t n, int64_t k,
                      int64_t blocksize) {
    const __m512i table = bf16_code_table(code);
    const int64_t passes = (m + PASS_ROWS - 1) / PASS_ROWS, per_pass = (m + passes - 1) / passes;
    const int64_t blocks = n / 32, group = passes == 1 ? blocks_side_by_side(m) : 1;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < (blocks + group - 1) / group; ++g) {
        const int64_t nb = g * group;
        if (group > 1 && nb + group <= blocks) {
            pass_of(x, kernel, scales, table, out, (int)m, 1, n, k, blocksize, nb);
            continue;
        }
        for (int64_t b = nb; b < nb + group && b < blocks; ++b)
            for (int64_t m0 = 0; m0 < m; m0 += per_pass)
                pass_of(x + m0 * k, kernel, scales, table, out + m0 * n,
                        (int)(m - m0 < per_pass ? m - m0 : per_pass), 0, n, k, blocksize, b);
    }
}

/* ------------------------------------------------------------------ AMX GEMM
 *
 * out[M, N] (bf16) = x[M, K] (bf16) @ W^T straight from the kernel layout, for CPUs with
 * AMX. bitsandbytes' fused kernel decodes the whole weight again for every few rows of x;
 * this decodes each 32 x 32 piece of W once per call into the VNNI tile layout AMX
 * multiplies (row r of a B tile: 16 columns n, each the pair W[n, 2r], W[n, 2r + 1]) and
 * lets TDPBF16PS accumulate in float32, up to 16 rows of x at a time. Two arithmetics:
 * - up to 32 rows (decode steps): the fused kernel's own, bf16 code values with the block
 *   scales applied to float32 block sums (the same bits as bitsandbytes' fused kernel but
 *   for the order of the float32 sums);
 * - more rows (prefill): dequantize + bf16 GEMM's, bf16(code[q] * scale) as `dequantize_t`
 *   computes it, each block of weights decoded once for every row of x.
 *
 * Tiles: 0, 1 accumulate rows of x against output columns 32 nb + [0, 16) and
 * [16, 32); 2 holds 16 rows x 32 columns of x; 3, 4 hold the matching two B tiles; with
 * more than 16 rows, 5, 6 and 7 are a second tile of rows' accumulators and x. */
#if defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Tiles 0-2 (first tile of x rows: accumulators and x) get `rows` rows, 5-7 (second tile
 * of x rows) `rows2`; the B tiles 3, 4 always 16. */
static void configure_tiles(int rows, int rows2) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = (uint8_t)(t <= 2 ? rows : t >= 5 ? rows2 : 16);
    }
    _tile_loadconfig(&cfg);
}

/* Two accumulator tiles (columns 0-15 and 16-31 of a block, stored into c), rounded to
 * bf16, into rows m0 .. m0 + rows - 1 of out. A macro: tile numbers are immediates. */
#define STORE_ROWS(out, n, m0, rows, nb, lo, hi)                                      \
    do {                                                                              \
        float c_[16][32] __attribute__((aligned(64)));                                \
        _tile_stored(lo, &c_[0][0], 128);                                             \
        _tile_stored(hi, &c_[0][16], 128);                                            \
        round_rows(c_, out, n, m0, rows, nb);                                         \
    } while (0)

static inline void round_rows(float c[16][32], uint16_t *out, int64_t n, int64_t m0,
                              int rows, int64_t nb) {
    for (int r = 0; r < rows; ++r) {
        const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(&c[r][16]),
                                                       _mm512_load_ps(&c[r][0]));
        _mm512_storeu_si512(out + (m0 + r) * n + 32 * nb, v);
    }
}

/* Up to 32 rows: bitsandbytes' fused kernel's arithmetic (what transformers runs on these
 * CPUs): bf16 code values times bf16 x summed in float32 over each quantization block,
 * then times the block's scale in float32. Decoding a piece is then one widen and two
 * 16-bit table lookups per 64 weights (no multiply, no conversion), and the scales cost
 * one float32 FMA per block, row and output. */

/* Block sums wait in `sums` (16 KB) until it is full, then are scaled into acc row by
 * row: the loads of a tile store come long after it (a vector load right after a tile
 * store stalls), and acc is read and written once per group of blocks, not per block. */
#define SUMS_FLOATS (8 * 16 * 32) /* 8 blocks of 16 rows, or 4 of 32 */
#define FEW_ROWS 32                /* two tiles of x rows */

/* acc[r] += sums of block b, row r (at sums + (b * stride + r) * 32) * block b's scales. */
static inline void add_scaled_sums(float acc[FEW_ROWS][32], const float *sums, int stride,
                                   const uint16_t *const *scales, int blocks, int rows) {
    __m512 lo[8], hi[8];
    for (int b = 0; b < blocks; ++b) {
        lo[b] = bf16x16_to_f32(scales[b]);
        hi[b] = bf16x16_to_f32(scales[b] + 16);
    }
    for (int r = 0; r < rows; ++r) {
        __m512 a_lo = _mm512_load_ps(&acc[r][0]), a_hi = _mm512_load_ps(&acc[r][16]);
        for (int b = 0; b < blocks; ++b) {
            const float *row = sums + (b * stride + r) * 32;
            a_lo = _mm512_fmadd_ps(_mm512_load_ps(row), lo[b], a_lo);
            a_hi = _mm512_fmadd_ps(_mm512_load_ps(row + 16), hi[b], a_hi);
        }
        _mm512_store_ps(&acc[r][0], a_lo);
        _mm512_store_ps(&acc[r][16], a_hi);
    }
}

/* Up to 32 rows of x against rows 32 nb .. 32 nb + 31 of W, piece by piece (`work`: 1024
 * bf16, stays in L1); tiles 0, 1 (and 5, 6 for rows 16-31, x in tile 7) hold one
 * quantization block's sums, so each decoded piece feeds up to four tile products. */
static void gemm_block_few_rows(const uint16_t *x, const uint8_t *kernel,
                                const uint16_t *scales, __m512i table, uint16_t *out,
                                uint16_t *work, int64_t m, int64_t n, int64_t k,
                                int64_t blocksize, int64_t nb) {
    const uint8_t *w = kernel + nb * (k / 2) * 32;
    const int64_t pieces = k / 32, per_block = blocksize / 32;
    const int two = m > 16, stride = two ? 32 : 16, capacity = SUMS_FLOATS / (stride * 32);
    float acc[FEW_ROWS][32] __attribute__((aligned(64)));
    float sums[SUMS_FLOATS] __attribute__((aligned(64)));
    const uint16_t *block_scales[8];
    int stored = 0;
    memset(acc, 0, sizeof(float) * 32 * (size_t)m);
    for (int64_t kt = 0; kt < pieces; ++kt) {
        if (kt % per_block == 0) {
            _tile_zero(0);
            _tile_zero(1);
            if (two) {
                _tile_zero(5);
                _tile_zero(6);
            }
        }
        decode_piece_codes(w + kt * 512, table, work);
        _tile_loadd(3, work, 64);
        _tile_loadd(4, work + 512, 64);
        _tile_loadd(2, x + 32 * kt, k * 2);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
        if (two) {
            _tile_loadd(7, x + 16 * k + 32 * kt, k * 2);
            _tile_dpbf16ps(5, 7, 3);
            _tile_dpbf16ps(6, 7, 4);
        }
        if (kt % per_block == per_block - 1 || kt == pieces - 1) {  /* a block (or K) ends */
            float *block = sums + stored * stride * 32;
            _tile_stored(0, block, 128);
            _tile_stored(1, block + 16, 128);
            if (two) {
                _tile_stored(5, block + 16 * 32, 128);
                _tile_stored(6, block + 16 * 32 + 16, 128);
            }
            block_scales[stored++] = scales + (32 * kt / blocksize) * n + 32 * nb;
            if (stored == capacity || kt == pieces - 1) {
                add_scaled_sums(acc, sums, stride, block_scales, stored, (int)m);
                stored = 0;
            }
        }
    }
    for (int r = 0; r < m; ++r) {
        const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(&acc[r][16]),
                                                       _mm512_load_ps(&acc[r][0]));
        _mm512_storeu_si512(out + r * n + 32 * nb, v);
    }
}

/* Every row of x against `group` blocks of 32 rows of W from nb: decode the blocks once
 * (`work`: group x 32 x k bf16, sized to stay in L2), then each tile of x rows is read
 * from memory once for the whole group and stays cached while every block multiplies it
 * (x is re-read once per group, not per block). Two tiles of rows at a time (tiles 0, 1
 * and 5, 6 accumulate, 2 and 7 hold x), so each B tile loaded feeds two products. The
 * tile shapes change for a last partial tile of rows and back after it. */
static void gemm_group_many_rows(const uint16_t *x, const uint8_t *kernel,
                                 const uint16_t *scales, __m512 lut, uint16_t *out,
                                 uint16_t *work, int64_t m, int64_t n, int64_t k,
                                 int64_t blocksize, int64_t nb, int64_t group) {
    const int64_t kt_count = k / 32, block = kt_count * 1024;
    for (int64_t g = 0; g < group; ++g) {
        const uint8_t *w = kernel + (nb + g) * (k / 2) * 32;
        for (int64_t kt = 0; kt < kt_count; ++kt)
            decode_piece(w + kt * 512, scales + (32 * kt / blocksize) * n + 32 * (nb + g),
                         lut, work + g * block + kt * 1024);
    }
    int64_t m0 = 0;
    for (; m0 + 32 <= m; m0 += 32) {
        for (int64_t g = 0; g < group; ++g) {
            const uint16_t *b = work + g * block;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(5);
            _tile_zero(6);
            for (int64_t kt = 0; kt < kt_count; ++kt) {
                _tile_loadd(3, b + kt * 1024, 64);
                _tile_loadd(4, b + kt * 1024 + 512, 64);
                _tile_loadd(2, x + m0 * k + 32 * kt, k * 2);
                _tile_loadd(7, x + (m0 + 16) * k + 32 * kt, k * 2);
                _tile_dpbf16ps(0, 2, 3);
                _tile_dpbf16ps(1, 2, 4);
                _tile_dpbf16ps(5, 7, 3);
                _tile_dpbf16ps(6, 7, 4);
            }
            STORE_ROWS(out, n, m0, 16, nb + g, 0, 1);
            STORE_ROWS(out, n, m0 + 16, 16, nb + g, 5, 6);
        }
    }
    for (; m0 < m; m0 += 16) {
        const int rows = m - m0 < 16 ? (int)(m - m0) : 16;
        if (rows < 16) configure_tiles(rows, 16);
        for (int64_t g = 0; g < group; ++g) {
            const uint16_t *b = work + g * block;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t kt = 0; kt < kt_count; ++kt) {
                _tile_loadd(2, x + m0 * k + 32 * kt, k * 2);
                _tile_loadd(3, b + kt * 1024, 64);
                _tile_loadd(4, b + kt * 1024 + 512, 64);
                _tile_dpbf16ps(0, 2, 3);
                _tile_dpbf16ps(1, 2, 4);
            }
            STORE_ROWS(out, n, m0, rows, nb + g, 0, 1);
        }
        if (rows < 16) configure_tiles(16, 16);
    }
}

/* Blocks of W decoded together for many rows: as many as fit in 512 KB (L2), 1 to 8. */
static int64_t blocks_per_group(int64_t k) {
    const int64_t fit = (512 * 1024) / (k * 64);
    return fit < 1 ? 1 : fit > 8 ? 8 : fit;
}

/* The caller has asked Linux for the AMX tile state (cpu.request_amx_tile_state). Blocks
 * of 32 rows of W are split over the OpenMP threads (torch's runtime: libgomp.so.1 is
 * already loaded, so torch.set_num_threads applies here too). Returns 0, or -1 when a
 * thread's work buffer could not be allocated (its rows of out are then not written). */
int gemm_4bit_amx(const uint16_t *x, const uint8_t *kernel, const uint16_t *scales,
                  const float *code, uint16_t *out, int64_t m, int64_t n, int64_t k,
                  int64_t blocksize) {
    const __m512 lut = _mm512_loadu_ps(code);
    const __m512i table = bf16_code_table(code);
    int failed = 0;
#pragma omp parallel
    {
        /* An even share of the blocks per thread, by hand rather than `omp for`, so that a
         * thread without a buffer can leave without the others waiting for it. */
        const int64_t blocks = n / 32, threads = omp_get_num_threads();
        const int64_t me = omp_get_thread_num();
        const int64_t nb0 = blocks * me / threads, nb1 = blocks * (me + 1) / threads;
        const int64_t group = blocks_per_group(k);
        const int few = m <= FEW_ROWS;
        uint16_t small[1024] __attribute__((aligned(64)));
        uint16_t *work = few ? small : aligned_alloc(64, (size_t)(group * k * 64));
        if (work == NULL) {
#pragma omp atomic write
            failed = 1;
        } else if (nb0 < nb1) {
            if (few)
                configure_tiles(m < 16 ? (int)m : 16, m > 16 ? (int)(m - 16) : 16);
            else
                configure_tiles(16, 16);
            for (int64_t nb = nb0; nb < nb1; nb += few ? 1 : group) {
                if (few)
                    gemm_block_few_rows(x, kernel, scales, table, out, work, m, n, k,
                                        blocksize, nb);
                else
                    gemm_group_many_rows(x, kernel, scales, lut, out, work, m, n, k, blocksize,
                                         nb, nb1 - nb < group ? nb1 - nb : group);
            }
            _tile_release();
        }
        if (work != small) free(work);
    }
    return failed ? -1 : 0;
}
#pragma GCC pop_options
#endif
