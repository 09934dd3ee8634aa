/* COCO evaluation kernels: pycocotools' evaluateImg matching and accumulate, in C.
 *
 * Plain C99 with no Python or numpy headers: kdet/metrics/native.py loads the shared
 * library with ctypes and passes numpy arrays as pointers. Each function runs one
 * stage over the whole dataset (every image, category, area range and threshold), so
 * an evaluation makes a handful of calls.
 *
 * The arithmetic is pycocotools' operation by operation (no -ffast-math, no FMA
 * contraction: see setup.py), so every value is bit-identical to its numpy code.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(_WIN32)
#define KDET_EXPORT __declspec(dllexport)
#else
#define KDET_EXPORT __attribute__((visibility("default")))
#endif

/* Version of this interface; native.py refuses a library with another. */
KDET_EXPORT int64_t kdet_cocoeval_abi(void) { return 10; }

/* evaluateImg's greedy matching for every (image, category) group, and the true /
 * false positive flags accumulate reads.
 *
 * Group g has detections group_first[g] .. + group_ndet[g] (evaluated detections in
 * score order, rank order within the group) and ground truths group_gt_first[g] .. +
 * group_ngt[g] (file order). Detection i's IoU with its group's j-th ground truth is
 * pair_iou[pair_start[i] + j]. gt_ignore is [num_gt, num_areas] (crowd, or outside
 * the area range, or no keypoints). For every area range, as pycocotools: ground truths
 * sorted with the regular ones first (stable); each detection in rank order takes, at
 * each threshold, the unmatched (or crowd) ground truth of the highest IoU >= min(t,
 * 1 - 1e-10), ties to the later one, an ignored one only if no regular one qualifies.
 *
 * Writes true_pos / false_pos [num_dets, num_areas, num_thr] for every detection:
 * pycocotools' dtm & ~dtIg and ~dtm & ~dtIg, where dtm is the matched ground truth's
 * id (tested for truth: an id of 0 is no match) and dtIg marks a detection matched to
 * an ignored ground truth, or unmatched and outside the area range (det_outside
 * [num_dets, num_areas]). Returns 0, or -1 when out of memory.
 */
KDET_EXPORT int64_t kdet_match_detections(
    int64_t num_groups, const int64_t *group_first, const int64_t *group_ndet,
    const int64_t *group_gt_first, const int64_t *group_ngt, const int64_t *pair_start,
    const double *pair_iou, const uint8_t *gt_ignore, const uint8_t *gt_crowd,
    const uint8_t *gt_id_nonzero, int64_t num_areas, const double *thresholds,
    int64_t num_thr, int64_t num_dets, const uint8_t *det_outside, uint8_t *true_pos,
    uint8_t *false_pos)
{
    /* unmatched: a false positive unless outside the area range */
    for (int64_t i = 0; i < num_dets * num_areas; i++) {
        memset(true_pos + i * num_thr, 0, (size_t)num_thr);
        memset(false_pos + i * num_thr, !det_outside[i], (size_t)num_thr);
    }
    int64_t max_gt = 0;
    for (int64_t g = 0; g < num_groups; g++)
        if (group_ngt[g] > max_gt) max_gt = group_ngt[g];
    /* No ground truth of IoU below every threshold can be matched, whatever is taken:
     * the search below skips it (it would only "continue"; a break it would have made
     * is made at the next candidate, an ignored one too, as the ignored come last).
     * Except after a NaN: pycocotools' "iou < best" lets a NaN through, and then every
     * later one (nothing is < NaN), so a detection with a NaN IoU searches them all. */
    double lowest = 1 - 1e-10;
    for (int64_t t = 0; t < num_thr; t++)
        if (thresholds[t] < lowest) lowest = thresholds[t];
    int64_t *order = malloc(sizeof(int64_t) * (size_t)(max_gt + 1));
    int64_t *candidates = malloc(sizeof(int64_t) * (size_t)(max_gt + 1));
    uint8_t *taken = malloc((size_t)(max_gt * num_thr + 1));
    if (!order || !candidates || !taken) {
        free(order);
        free(candidates);
        free(taken);
        return -1;
    }
    for (int64_t g = 0; g < num_groups; g++) {
        const int64_t ngt = group_ngt[g], gt0 = group_gt_first[g];
        if (ngt == 0) continue;
        for (int64_t a = 0; a < num_areas; a++) {
            /* pycocotools: gtind = np.argsort(gtIg, kind='mergesort') */
            int64_t n = 0;
            for (int64_t j = 0; j < ngt; j++)
                if (!gt_ignore[(gt0 + j) * num_areas + a]) order[n++] = j;
            for (int64_t j = 0; j < ngt; j++)
                if (gt_ignore[(gt0 + j) * num_areas + a]) order[n++] = j;
            memset(taken, 0, (size_t)(ngt * num_thr));
            for (int64_t r = 0; r < group_ndet[g]; r++) {
                const int64_t det = group_first[g] + r;
                const double *iou = pair_iou + pair_start[det];
                int64_t num_candidates = 0, with_nan = 0;
                for (int64_t s = 0; s < ngt; s++) {
                    const double value = iou[order[s]];
                    with_nan |= value != value;
                    if (!(value < lowest)) candidates[num_candidates++] = order[s];
                }
                if (num_candidates == 0) continue;
                const int64_t *searched = with_nan ? order : candidates;
                if (with_nan) num_candidates = ngt;
                for (int64_t t = 0; t < num_thr; t++) {
                    double best = thresholds[t] < 1 - 1e-10 ? thresholds[t] : 1 - 1e-10;
                    int64_t m = -1;
                    uint8_t m_ignored = 0;
                    for (int64_t s = 0; s < num_candidates; s++) {
                        const int64_t j = searched[s];
                        const uint8_t ignored = gt_ignore[(gt0 + j) * num_areas + a];
                        if (taken[t * ngt + j] && !gt_crowd[gt0 + j]) continue;
                        if (m > -1 && !m_ignored && ignored) break;
                        if (iou[j] < best) continue;
                        best = iou[j];
                        m = j;
                        m_ignored = ignored;
                    }
                    if (m == -1) continue;
                    taken[t * ngt + m] = 1;
                    const int64_t out = (det * num_areas + a) * num_thr + t;
                    true_pos[out] = gt_id_nonzero[gt0 + m] && !m_ignored;
                    false_pos[out] = !gt_id_nonzero[gt0 + m] && !m_ignored;
                }
            }
        }
    }
    free(order);
    free(candidates);
    free(taken);
    return 0;
}

/* How many counts the num compressed RLE strings text[starts[i] .. ends[i]] hold: the
 * characters that end a number (no continuation bit 0x20), plus one per string for an
 * unfinished last one. */
KDET_EXPORT int64_t kdet_rle_count(int64_t num, const char *text, const int64_t *starts,
                                   const int64_t *ends)
{
    int64_t total = num;
    for (int64_t r = 0; r < num; r++)
        for (int64_t i = starts[r]; i < ends[r]; i++)
            total += !((char)(text[i] - 48) & 0x20);
    return total;
}

/* pycocotools' rleFrString for num compressed RLE strings in text (string i is
 * text[starts[i] .. ends[i]]: back to back, or any spans of a larger text): the counts of
 * RLE i go to counts[count_offsets[i] .. count_offsets[i + 1]] (counts has room for every
 * number, kdet_rle_count). The strings were checked before (kdet.metrics.rle.check_counts).
 */
KDET_EXPORT int64_t kdet_rle_decode(int64_t num, const char *text, const int64_t *starts,
                                    const int64_t *ends, uint32_t *counts,
                                    int64_t *count_offsets)
{
    int64_t m = 0;
    count_offsets[0] = 0;
    for (int64_t r = 0; r < num; r++) {
        const int64_t first = m;
        int64_t p = starts[r];
        const int64_t end = ends[r];
        while (p < end) {
            long x = 0;
            int64_t k = 0;
            int more = 1;
            while (more && p < end) {
                const char c = (char)(text[p] - 48);
                x |= (long)(c & 0x1f) << 5 * k;
                more = c & 0x20;
                p++;
                k++;
                if (!more && (c & 0x10)) x |= -1L << 5 * k;
            }
            if (m - first > 2) x += (long)counts[m - 2];  /* pycocotools: m > 2 */
            counts[m++] = (uint32_t)x;
        }
        count_offsets[r + 1] = m;
    }
    return 0;
}

/* One compressed RLE string's numbers, checked, with pycocotools' rleFrString running
 * sums: runs the statement EMIT for each run (which reads the run, x, and its index,
 * m). Sets status to 0 (valid: every run within [0,
 * num_pixels] and adding up to num_pixels), 1 (invalid: a character outside the
 * alphabet 48..111, the string ends inside a number, a run out of range or the runs
 * do not add up), or 2 (a number of more than 12 characters: left to the caller's
 * exact arbitrary-precision reading). The values are exact integers, as
 * kdet.metrics.rle.decode_rle_strings' (not pycocotools' wrapping long/uint). */
#define KDET_RLE_SCAN(text, begin, end, num_pixels, EMIT, status)                          \
    do {                                                                                   \
        int64_t prev2 = 0, prev1 = 0, total = 0, m = 0;                                    \
        int64_t p = (begin);                                                               \
        status = 0;                                                                        \
        while (p < (end) && status == 0) {                                                 \
            uint64_t bits = 0;                                                             \
            int k = 0, more = 1;                                                           \
            int64_t x = 0;                                                                 \
            const uint8_t c0 = (uint8_t)((uint8_t)(text)[p] - 48);                         \
            if (c0 < 32) { /* one character (most runs): the loop's first step alone */    \
                bits = (c0 & 0x10) ? (uint64_t)c0 | ~(uint64_t)0x1f : (uint64_t)c0;        \
                p++;                                                                       \
                more = 0;                                                                  \
            }                                                                              \
            while (more) {                                                                 \
                if (p >= (end)) { status = 1; break; }  /* ends inside a number */         \
                const uint8_t c = (uint8_t)((uint8_t)(text)[p] - 48);                      \
                if (c >= 64) { status = 1; break; }                                        \
                if (k == 12) { status = 2; break; }                                        \
                bits |= (uint64_t)(c & 0x1f) << (5 * k);                                   \
                more = c & 0x20;                                                           \
                p++;                                                                       \
                k++;                                                                       \
                if (!more && (c & 0x10)) bits |= ~(uint64_t)0 << (5 * k);                  \
            }                                                                              \
            if (status) break;                                                             \
            x = (int64_t)bits;                                                             \
            if (m > 2) x += prev2;                                                         \
            if (x < 0 || x > (num_pixels) || total + x > (num_pixels)) { status = 1; break; } \
            total += x;                                                                    \
            EMIT;                                                                          \
            prev2 = prev1;                                                                 \
            prev1 = x;                                                                     \
            m++;                                                                           \
        }                                                                                  \
        if (status == 0 && total != (num_pixels)) status = 1;                              \
    } while (0)

/* cc += count, as the position (x, y) of cc = x h + y, y < h (h > 0) */
static inline void advance_position(uint32_t *x, uint32_t *y, uint32_t count, uint32_t h)
{
    if (count < h) {
        *y += count;
    } else {
        *x += count / h;
        *y += count % h;
    }
    if (*y >= h) {
        *y -= h;
        (*x)++;
    }
}

/* pycocotools' rleArea of m runs: the odd-indexed ones, in uint32 as pycocotools */
static double rle_area(const uint32_t *cnts, int64_t m)
{
    uint32_t a = 0;
    for (int64_t j = 1; j < m; j += 2) a += cnts[j];
    return (double)a;
}

/* rleToBbox's extent so far */
typedef struct {
    uint32_t xs, xe, ys, ye, across;
} Extent;

/* a foreground run from pixel (x0, y0) to pixel (x1, y1) (x = column) */
static inline void extent_take_run(Extent *e, uint32_t x0, uint32_t y0, uint32_t x1,
                                   uint32_t y1)
{
    e->xs = x0 < e->xs ? x0 : e->xs;
    e->xe = x1 > e->xe ? x1 : e->xe;
    if (x0 < x1) {
        e->across = 1;
    } else {
        e->ys = y0 < e->ys ? y0 : e->ys;
        e->ye = y1 > e->ye ? y1 : e->ye;
    }
}

/* pycocotools' rleArea and rleToBbox (x, y, w, h as doubles) of one RLE of m_all runs,
 * h x w pixels, with the runs adding up to h w. rleToBbox as fixed in 2021 in
 * ppwwyyxx/cocoapi, the source of PyPI's pycocotools (cocoapi pull request 477; checked
 * against 2.0.11; the earlier one also took the pixels next to empty runs): over the
 * (background, foreground) pairs of the first m = m_all // 2 * 2 runs, each non-empty
 * foreground run's first pixel start and last pixel cc - 1 give (x, y) = (t / h,
 * t % h); x spans them; y spans them where the run stays in one
 * column, else it is 0 .. h - 1. In uint32 as pycocotools (the box's width and height
 * wrap when no run is foreground). The positions are tracked as (x, y) instead of
 * divided out each run (a division costs more than the rest), except where
 * pycocotools' uint32 running sum wraps (masks of 2**32 pixels or more). */
static void rle_measure(const uint32_t *cnts, int64_t m_all, uint32_t h, uint32_t w,
                        double *area, double *bb)
{
    *area = rle_area(cnts, m_all);
    const int64_t m = (m_all / 2) * 2;
    if (m == 0) {
        bb[0] = bb[1] = bb[2] = bb[3] = 0;
        return;
    }
    Extent e = {w, 0, h, 0, 0};
    if (h == 0) {
        /* no pixel: every run is empty (they add up to 0) */
    } else if ((uint64_t)h * w > UINT32_MAX) {
        uint32_t cc = 0;
        for (int64_t j = 0; j < m; j += 2) {
            cc += cnts[j];
            const uint32_t start = cc;
            cc += cnts[j + 1];
            if (!cnts[j + 1]) continue;
            const uint32_t y0 = start % h, x0 = (start - y0) / h;
            const uint32_t y1 = (cc - 1) % h, x1 = (cc - 1 - y1) / h;
            extent_take_run(&e, x0, y0, x1, y1);
        }
    } else {
        uint32_t x = 0, y = 0;
        for (int64_t j = 0; j < m; j += 2) {
            advance_position(&x, &y, cnts[j], h);
            if (!cnts[j + 1]) continue;
            const uint32_t x0 = x, y0 = y;  /* the foreground run's first pixel */
            advance_position(&x, &y, cnts[j + 1], h);
            const uint32_t x1 = y > 0 ? x : x - 1, y1 = y > 0 ? y - 1 : h - 1;  /* its last */
            extent_take_run(&e, x0, y0, x1, y1);
        }
    }
    if (e.across) {  /* pycocotools sets 0 and h - 1, which no later run moves */
        e.ys = 0;
        e.ye = h - 1;
    }
    bb[0] = e.xs;
    bb[2] = (uint32_t)(e.xe - e.xs + 1);
    bb[1] = e.ys;
    bb[3] = (uint32_t)(e.ye - e.ys + 1);
}

/* Checks num compressed RLE strings (string i is text[text_offsets[i] .. text_offsets[i
 * + 1]], of heights[i] x widths[i] pixels) and measures the valid ones in the same
 * pass (the runs of one string at a time in a scratch buffer): status[i] as
 * KDET_RLE_SCAN's; for status 0, area[i] and bbox[4 i ..] as maskUtils.area and
 * maskUtils.toBbox. Returns 0, or -1 when out of memory. */
KDET_EXPORT int64_t kdet_rle_check(int64_t num, const char *text, const int64_t *text_offsets,
                                   const int64_t *heights, const int64_t *widths,
                                   uint8_t *status, double *area, double *bbox)
{
    int64_t longest = 1;  /* a string of n characters holds at most n runs */
    for (int64_t r = 0; r < num; r++)
        if (text_offsets[r + 1] - text_offsets[r] > longest)
            longest = text_offsets[r + 1] - text_offsets[r];
    uint32_t *runs = malloc(sizeof(uint32_t) * (size_t)longest);
    if (!runs) return -1;
    for (int64_t r = 0; r < num; r++) {
        const int64_t num_pixels = heights[r] * widths[r];
        int64_t num_runs = 0;
        int st;
        KDET_RLE_SCAN(text, text_offsets[r], text_offsets[r + 1], num_pixels, {
            runs[num_runs++] = (uint32_t)x;
        }, st);
        status[r] = (uint8_t)st;
        if (st) {  /* the runs read before the problem, as maskUtils.area would count them */
            area[r] = rle_area(runs, num_runs);
            continue;
        }
        rle_measure(runs, num_runs, (uint32_t)heights[r], (uint32_t)widths[r], area + r,
                    bbox + 4 * r);
    }
    free(runs);
    return 0;
}

/* pycocotools' rleToString of num RLEs (counts[offsets[i] .. offsets[i + 1]]): text gets
 * every string back to back (room for 7 characters a run), text_offsets[i + 1] the end
 * of string i. */
KDET_EXPORT int64_t kdet_rle_encode(int64_t num, const uint32_t *counts, const int64_t *offsets,
                                    char *text, int64_t *text_offsets)
{
    int64_t p = 0;
    text_offsets[0] = 0;
    for (int64_t r = 0; r < num; r++) {
        const uint32_t *cnts = counts + offsets[r];
        const int64_t m = offsets[r + 1] - offsets[r];
        for (int64_t i = 0; i < m; i++) {
            int64_t x = (int64_t)cnts[i] - (i > 2 ? (int64_t)cnts[i - 2] : 0);
            int more = 1;
            while (more) {
                char c = (char)(x & 0x1f);
                x >>= 5;  /* arithmetic shift: gcc and clang on every target kdet builds on */
                more = (c & 0x10) ? x != -1 : x != 0;
                if (more) c |= 0x20;
                text[p++] = (char)(c + 48);
            }
        }
        text_offsets[r + 1] = p;
    }
    return 0;
}

/* Polygon i's k = (xy_offsets[i + 1] - xy_offsets[i]) / 2 vertices, scaled by 5 and
 * rounded as pycocotools' rleFrPoly: (int)(5 * v + .5). */
static void scaled_vertices(const double *xy, int64_t k, int *x, int *y)
{
    const double scale = 5;
    for (int64_t j = 0; j < k; j++) {
        x[j] = (int)(scale * xy[2 * j] + .5);
        y[j] = (int)(scale * xy[2 * j + 1] + .5);
    }
    if (k > 0) {
        x[k] = x[0];
        y[k] = y[0];
    }
}

/* At most this many column crossings (plus the end) come out of a polygon's boundary:
 * an edge of scaled width dx crosses at most dx / 5 + 1 pixel-centre columns (and a
 * rounding at an end may add one between edges). */
static int64_t polygon_bound(const int *x, int64_t k)
{
    int64_t n = 2;
    for (int64_t j = 0; j < k; j++) n += abs(x[j] - x[j + 1]) / 5 + 3;  /* + 1 per edge, + 2 spare */
    return n;
}

static int64_t vertices_needed(int64_t num_polys, const int64_t *xy_offsets)
{
    int64_t most = 0;
    for (int64_t i = 0; i < num_polys; i++)
        if ((xy_offsets[i + 1] - xy_offsets[i]) / 2 > most) most = (xy_offsets[i + 1] - xy_offsets[i]) / 2;
    return most + 1;
}

/* Upper bounds of kdet_polygons_to_rle's runs, per polygon (bound[i]); returns their
 * sum, or -1 when out of memory. */
KDET_EXPORT int64_t kdet_polygon_bounds(int64_t num_polys, const double *xy,
                                        const int64_t *xy_offsets, int64_t *bound)
{
    const int64_t most = vertices_needed(num_polys, xy_offsets);
    int *x = malloc(sizeof(int) * (size_t)most), *y = malloc(sizeof(int) * (size_t)most);
    if (!x || !y) {
        free(x);
        free(y);
        return -1;
    }
    int64_t total = 0;
    for (int64_t i = 0; i < num_polys; i++) {
        const int64_t k = (xy_offsets[i + 1] - xy_offsets[i]) / 2;
        scaled_vertices(xy + xy_offsets[i], k, x, y);
        bound[i] = polygon_bound(x, k);
        total += bound[i];
    }
    free(x);
    free(y);
    return total;
}

/* One boundary point of the upsampled outline; keeps pycocotools' y-boundary points
 * (where the scaled x crosses a pixel centre column) as positions x * h + y. */
typedef struct {
    int has_prev, prev_u, prev_v;
    uint32_t *points, *columns;
    int64_t n;
    double h, w_last;
    int h_int;
} Outline;

/* floor(a / 5) for any int a */
static int floor_div5(int a) { return a >= 0 ? a / 5 : -((4 - a) / 5); }

static inline void outline_point(Outline *o, int u, int v)
{
    /* pycocotools: xd = (min u of the pair + .5) / 5 - .5, kept when it is an integer in
     * [0, w - 1]; yd = ceil of (min v + .5) / 5 - .5 clamped to [0, h]. In integers: xd is
     * an integer exactly when the min u is 2 mod 5 (then the float steps are exact:
     * (5c + 2.5) / 5 = c + .5), and yd's ceil is ceil((min v - 2) / 5) (the float value
     * is exact whenever that is an integer, and >= .2 from one otherwise). */
    if (o->has_prev && u != o->prev_u) {
        const int a = (u < o->prev_u ? u : u - 1) - 2;
        const int c = floor_div5(a);
        if (a == 5 * c && c >= 0 && (double)c <= o->w_last) {
            const int b = v < o->prev_v ? v : o->prev_v;
            int yd = b < 0 ? 0 : floor_div5(b - 2 + 4);  /* b < 0: below 0 (b may be INT_MIN) */
            yd = yd > o->h_int ? o->h_int : yd;
            o->columns[o->n] = (uint32_t)c + (yd == o->h_int);
            o->points[o->n++] = (uint32_t)(c * o->h_int + yd);
        }
    }
    o->has_prev = 1;
    o->prev_u = u;
    o->prev_v = v;
}

/* pycocotools' rleFrPoly of num_polys polygons (polygon i: the doubles xy[xy_offsets[i]
 * .. xy_offsets[i + 1]] as x, y pairs, a trailing odd one ignored; heights[i] x
 * widths[i] pixels): the runs of polygon i go to counts[count_offsets[i] ..
 * count_offsets[i + 1]], back to back (counts has room for kdet_polygon_bounds' sum).
 *
 * The same outline as pycocotools (each edge upsampled 5x, stepped along its longer
 * axis, the same roundings), read point by point instead of stored; the y-boundary
 * points are sorted by column (a counting sort over the polygon's columns, then an
 * insertion sort within a column: few points each) instead of qsort: the same order.
 * Returns 0, or -1 when out of memory. */
KDET_EXPORT int64_t kdet_polygons_to_rle(int64_t num_polys, const double *xy,
                                         const int64_t *xy_offsets, const int64_t *heights,
                                         const int64_t *widths, uint32_t *counts,
                                         int64_t *count_offsets)
{
    const int64_t most = vertices_needed(num_polys, xy_offsets);
    int *x = malloc(sizeof(int) * (size_t)most), *y = malloc(sizeof(int) * (size_t)most);
    int64_t cap = 16, col_cap = 16;
    uint32_t *points = malloc(sizeof(uint32_t) * (size_t)cap);
    uint32_t *sorted = malloc(sizeof(uint32_t) * (size_t)cap);
    uint32_t *columns = malloc(sizeof(uint32_t) * (size_t)cap);
    int64_t *col_start = malloc(sizeof(int64_t) * (size_t)col_cap);
    int64_t status = 0, out = 0;
    count_offsets[0] = 0;
    if (!x || !y || !points || !sorted || !columns || !col_start) {
        status = -1;
        goto done;
    }
    for (int64_t i = 0; i < num_polys; i++) {
        const int64_t k = (xy_offsets[i + 1] - xy_offsets[i]) / 2;
        const int64_t h = heights[i], w = widths[i];
        scaled_vertices(xy + xy_offsets[i], k, x, y);
        const int64_t bound = polygon_bound(x, k);
        if (bound > cap) {
            cap = bound * 2;
            free(points);
            free(sorted);
            free(columns);
            points = malloc(sizeof(uint32_t) * (size_t)cap);
            sorted = malloc(sizeof(uint32_t) * (size_t)cap);
            columns = malloc(sizeof(uint32_t) * (size_t)cap);
            if (!points || !sorted || !columns) {
                status = -1;
                goto done;
            }
        }
        Outline o = {0, 0, 0, points, columns, 0, (double)(uint64_t)h, (double)((uint64_t)w - 1),
                     (int)h};
        for (int64_t j = 0; j < k; j++) {
            int xs = x[j], xe = x[j + 1], ys = y[j], ye = y[j + 1];
            const int dx = abs(xe - xs), dy = abs(ys - ye);
            const int flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
            if (flip) {
                int t = xs;
                xs = xe;
                xe = t;
                t = ys;
                ys = ye;
                ye = t;
            }
            const double s = dx >= dy ? (double)(ye - ys) / dx : (double)(xe - xs) / dy;
            if (dx >= dy) {
                /* u steps by one along the edge: of the pairs (d - 1, d) only those whose
                 * smaller u is 2 mod 5 can be kept ((u + .5) / 5 - .5 is an integer), so
                 * only they are visited; then the last point becomes the previous one */
                int t = flip ? dx : 0;
                outline_point(&o, t + xs, (int)(ys + s * t + .5));
                int d = flip ? ((xs + dx - 2) % 5 + 5) % 5 : ((3 - xs) % 5 + 5) % 5;
                for (d = d == 0 ? 5 : d; d <= dx; d += 5) {
                    t = flip ? dx - (d - 1) : d - 1;
                    o.prev_u = t + xs;
                    o.prev_v = (int)(ys + s * t + .5);
                    t = flip ? dx - d : d;
                    outline_point(&o, t + xs, (int)(ys + s * t + .5));
                }
                t = flip ? 0 : dx;
                o.prev_u = t + xs;
                o.prev_v = (int)(ys + s * t + .5);
            } else if (dx == 0) {
                /* u is the same all along (s * t is 0): only the first point can pair
                 * with the previous edge's last */
                int t = flip ? dy : 0;
                outline_point(&o, (int)(xs + s * t + .5), t + ys);
                t = flip ? 0 : dy;
                o.prev_u = (int)(xs + s * t + .5);
                o.prev_v = t + ys;
            } else if (dy < (1 << 20) && abs(xs) < (1 << 22) && abs(xe) < (1 << 22)) {
                /* v steps by one, u = U(t) by at most one a step, monotonically (|s| <
                 * 1 - 2**-20, far above the roundings' error at these sizes): of the pairs
                 * where u changes, only those between 5c + 2 and 5c + 3 can be kept, so
                 * only they are visited, each found from an estimate corrected with the
                 * exact U; then the last point becomes the previous one */
#define KDET_STEEP_U(t) ((int)(xs + s * (t) + .5))
                const int t_first = flip ? dy : 0, t_last = flip ? 0 : dy;
                outline_point(&o, KDET_STEEP_U(t_first), t_first + ys);
                const int u_start = KDET_STEEP_U(0), u_end = KDET_STEEP_U(dy);
                const int rising = u_end > u_start;
                const int u_lo = rising ? u_start : u_end, u_hi = rising ? u_end : u_start;
                for (int m = u_lo + ((2 - u_lo) % 5 + 5) % 5; m < u_hi; m += 5) {
                    /* the first t with U(t) >= m + 1 (rising) or U(t) <= m (falling) */
                    const double estimate = ceil((m + .5 - xs) / s);
                    int t = estimate < 1 ? 1 : estimate > dy ? dy : (int)estimate;
                    if (rising) {
                        while (t > 1 && KDET_STEEP_U(t - 1) > m) t--;
                        while (KDET_STEEP_U(t) <= m) t++;
                    } else {
                        while (t > 1 && KDET_STEEP_U(t - 1) <= m) t--;
                        while (KDET_STEEP_U(t) > m) t++;
                    }
                    o.prev_u = KDET_STEEP_U(t - 1);
                    o.prev_v = t - 1 + ys;
                    outline_point(&o, KDET_STEEP_U(t), t + ys);
                }
                o.prev_u = KDET_STEEP_U(t_last);
                o.prev_v = t_last + ys;
#undef KDET_STEEP_U
            } else
                for (int d = 0; d <= dy; d++) {
                    const int t = flip ? dy - d : d;
                    outline_point(&o, (int)(xs + s * t + .5), t + ys);
                }
        }
        /* counting sort of the boundary points by column over the outline's columns
         * only; the end h * w, at least every point, goes last */
        const int64_t n = o.n + 1, n_points = o.n;
        uint32_t lo = UINT32_MAX, hi = 0;
        for (int64_t j = 0; j < n_points; j++) {
            const uint32_t c = columns[j];
            lo = c < lo ? c : lo;
            hi = c > hi ? c : hi;
        }
        if (n_points == 0) lo = hi = 0;
        const int64_t num_cols = (int64_t)(hi - lo) + 2;
        if (num_cols > col_cap) {
            col_cap = num_cols * 2;
            free(col_start);
            col_start = malloc(sizeof(int64_t) * (size_t)col_cap);
            if (!col_start) {
                status = -1;
                goto done;
            }
        }
        memset(col_start, 0, sizeof(int64_t) * (size_t)num_cols);
        for (int64_t j = 0; j < n_points; j++) col_start[columns[j] - lo + 1]++;
        for (int64_t c = 1; c < num_cols; c++) col_start[c] += col_start[c - 1];
        for (int64_t j = 0; j < n_points; j++) sorted[col_start[columns[j] - lo]++] = points[j];
        sorted[n_points] = (uint32_t)(h * w);
        /* col_start[c] is now column c's end: insertion sort within each column */
        int64_t begin = 0;
        for (int64_t c = 0; c + 1 < num_cols; c++) {
            const int64_t end = col_start[c];
            for (int64_t a = begin + 1; a < end; a++) {
                const uint32_t v = sorted[a];
                int64_t b = a;
                while (b > begin && sorted[b - 1] > v) {
                    sorted[b] = sorted[b - 1];
                    b--;
                }
                sorted[b] = v;
            }
            begin = end;
        }
        /* differences; a zero difference (two boundaries at one place) cancels: the
         * next difference joins the previous run */
        uint32_t previous = 0;
        int64_t m = 0, j = 0;
        uint32_t *runs = counts + out;
        while (j < n) {
            const uint32_t diff = sorted[j] - previous;
            previous = sorted[j];
            if (j == 0 || diff > 0) {
                runs[m++] = diff;
                j++;
                continue;
            }
            j++;
            if (j < n) {
                runs[m - 1] += sorted[j] - previous;
                previous = sorted[j];
                j++;
            }
        }
        out += m;
        count_offsets[i + 1] = out;
    }
done:
    free(x);
    free(y);
    free(points);
    free(sorted);
    free(columns);
    free(col_start);
    return status;
}

/* One cursor of a two-RLE walk (pycocotools' rleMerge / rleIou): take c from the current
   run; when it is used up and runs are left, move to the next run, whose value flips.
   Returns what remains of the current run. */
static inline uint32_t rle_step(uint32_t *count, int64_t *index, int *value,
                                const uint32_t *runs, int64_t length, uint32_t c)
{
    *count -= c;
    if (!*count && *index < length) {
        *count = runs[(*index)++];
        *value = !*value;
    }
    return *count;
}

/* pycocotools' rleMerge (union, intersect=0) of consecutive RLEs of one size: group g
 * unites group_size[g] RLEs (in order, pairwise as pycocotools), writing its runs to
 * out[out_offsets[g] ..] back to back (out has room for all input runs). Returns 0, or
 * -1 when out of memory. */
KDET_EXPORT int64_t kdet_rle_union(int64_t num_groups, const int64_t *group_size,
                                   const uint32_t *counts, const int64_t *offsets,
                                   uint32_t *out, int64_t *out_offsets)
{
    int64_t most = 1, r = 0;
    for (int64_t g = 0; g < num_groups; g++) {
        const int64_t n = offsets[r + group_size[g]] - offsets[r];
        most = n > most ? n : most;
        r += group_size[g];
    }
    uint32_t *acc = malloc(sizeof(uint32_t) * (size_t)(most + 1));
    uint32_t *next = malloc(sizeof(uint32_t) * (size_t)(most + 1));
    if (!acc || !next) {
        free(acc);
        free(next);
        return -1;
    }
    int64_t o = 0;
    r = 0;
    out_offsets[0] = 0;
    for (int64_t g = 0; g < num_groups; g++) {
        int64_t m = offsets[r + 1] - offsets[r];
        memcpy(acc, counts + offsets[r], sizeof(uint32_t) * (size_t)m);
        for (int64_t q = 1; q < group_size[g]; q++) {
            const uint32_t *bc = counts + offsets[r + q];
            const int64_t kb = offsets[r + q + 1] - offsets[r + q];
            uint32_t ca = acc[0], cb = bc[0], cc = 0, ct = 1;
            int64_t a = 1, b = 1, n = 0;
            int va = 0, vb = 0, v = 0;
            while (ct > 0) {
                const uint32_t c = ca < cb ? ca : cb;
                cc += c;
                ct = rle_step(&ca, &a, &va, acc, m, c) + rle_step(&cb, &b, &vb, bc, kb, c);
                const int vp = v;
                v = va || vb;
                if (v != vp || ct == 0) {
                    next[n++] = cc;
                    cc = 0;
                }
            }
            uint32_t *t = acc;
            acc = next;
            next = t;
            m = n;
        }
        memcpy(out + o, acc, sizeof(uint32_t) * (size_t)m);
        o += m;
        out_offsets[g + 1] = o;
        r += group_size[g];
    }
    free(acc);
    free(next);
    return 0;
}

/* pycocotools' rleArea and rleToBbox (x, y, w, h as doubles) of num decoded RLEs of
 * heights[i] x widths[i] pixels (rle_measure). */
KDET_EXPORT int64_t kdet_rle_area_bbox(int64_t num, const uint32_t *counts,
                                       const int64_t *count_offsets, const int64_t *heights,
                                       const int64_t *widths, double *area, double *bbox)
{
    for (int64_t r = 0; r < num; r++)
        rle_measure(counts + count_offsets[r], count_offsets[r + 1] - count_offsets[r],
                    (uint32_t)heights[r], (uint32_t)widths[r], area + r, bbox + 4 * r);
    return 0;
}

/* maskApi.c's bbIou of aligned pairs: detection box det_boxes[det_index[p]] with ground
 * truth gt_boxes[gt_index[p]] (xywh), operation for operation; union = the detection's
 * area for a crowd ground truth (gt_crowd[gt_index[p]]); 0 without overlap. */
KDET_EXPORT int64_t kdet_pair_box_iou(
    int64_t num_pairs, const double *det_boxes, const int64_t *det_index,
    const double *gt_boxes, const int64_t *gt_index, const uint8_t *gt_crowd, double *out)
{
    for (int64_t p = 0; p < num_pairs; p++) {
        const double *D = det_boxes + det_index[p] * 4, *G = gt_boxes + gt_index[p] * 4;
        const double ga = G[2] * G[3], da = D[2] * D[3];
        out[p] = 0;
        const double w = fmin(D[2] + D[0], G[2] + G[0]) - fmax(D[0], G[0]);
        if (w <= 0) continue;
        const double h = fmin(D[3] + D[1], G[3] + G[1]) - fmax(D[1], G[1]);
        if (h <= 0) continue;
        const double i = w * h;
        out[p] = i / (gt_crowd[gt_index[p]] ? da : da + ga - i);
    }
    return 0;
}

/* pycocotools' rleIou of aligned pairs (RLE a_index[p] of set a, b_index[p] of set b,
 * same size): intersection / union pixel counts, union = a's area for a crowd b. */
KDET_EXPORT int64_t kdet_rle_pair_iou(
    int64_t num_pairs, const int64_t *a_index, const int64_t *b_index, const uint32_t *a_counts,
    const int64_t *a_offsets, const uint32_t *b_counts, const int64_t *b_offsets,
    const uint8_t *crowd, double *iou)
{
    for (int64_t p = 0; p < num_pairs; p++) {
        const uint32_t *ac = a_counts + a_offsets[a_index[p]];
        const uint32_t *bc = b_counts + b_offsets[b_index[p]];
        const int64_t ka = a_offsets[a_index[p] + 1] - a_offsets[a_index[p]];
        const int64_t kb = b_offsets[b_index[p] + 1] - b_offsets[b_index[p]];
        if (ka == 0 || kb == 0) {  /* a 0 x 0 image */
            iou[p] = 0;
            continue;
        }
        uint32_t ca = ac[0], cb = bc[0], c, ct = 1, i = 0, u = 0;
        int64_t a = 1, b = 1;
        int va = 0, vb = 0;
        while (ct > 0) {
            c = ca < cb ? ca : cb;
            if (va || vb) {
                u += c;
                if (va && vb) i += c;
            }
            ct = rle_step(&ca, &a, &va, ac, ka, c) + rle_step(&cb, &b, &vb, bc, kb, c);
        }
        if (i == 0) u = 1;
        else if (crowd[p]) {
            u = 0;
            for (int64_t j = 1; j < ka; j += 2) u += ac[j];
        }
        iou[p] = (double)i / (double)u;
    }
    return 0;
}

/* pycocotools' computeOks, first half: the exponents e of every (detection, ground
 * truth) pair, pair p's used keypoints packed at exponents[p * num_kpts ..], their count
 * in count[p] (only pairs kept, see below, get a row: pair near[r] is row r of
 * *num_near). Used: the ground truth's labelled keypoints (v > 0), or all of them
 * when none is labelled (then the distance is to the ground truth's box grown to 3x).
 * e = (dx**2 + dy**2) / variance / (area + eps) / 2 in numpy's operation order.
 * A pair whose every e exceeds max_exponent gets no row: its OKS, a mean of
 * exp(-e), is below the lowest threshold (the caller picks max_exponent so), so it
 * never matches and is left 0 (and no exponential is taken for it). The exponentials are
 * numpy's (np.exp, as pycocotools), the mean kdet_oks_means'.
 * det_reach [D, 4] and gt_reach [G, 4] (x min, x max, y min, y max) bound where the
 * distances are taken from: a detection's keypoints; a ground truth's labelled
 * keypoints, or its grown box when none is labelled. The gap between the two bounds a
 * pair's every dx, dy from below, so a pair whose gap is beyond the widest sigma's reach
 * is dropped without a look at its keypoints (a NaN bound drops nothing).
 */
KDET_EXPORT int64_t kdet_oks_exponents(
    int64_t num_pairs, const int64_t *pair_det, const int64_t *pair_gt, const double *det_kpts,
    const double *gt_kpts, const double *gt_box, const double *gt_area,
    const double *variances, int64_t num_kpts, double max_exponent, const double *det_reach,
    const double *gt_reach, double *exponents, int64_t *count, int64_t *near,
    int64_t *num_near)
{
    /* A pair is first tested without divisions: e > max_exponent for every keypoint
     * once dx**2 + dy**2 > max_exponent * 2 * variance * scale with a margin far above
     * the rounding of e's three divisions and this product (relative 1e-15 each); only
     * pairs that fail the test get their exponents (most pairs are far apart). */
    const double reach = max_exponent * 2 * (1 + 1e-9);
    double widest = 0, narrowest = INFINITY;
    for (int64_t j = 0; j < num_kpts; j++) {
        if (variances[j] > widest) widest = variances[j];
        if (!(variances[j] >= narrowest)) narrowest = variances[j];  /* NaN sticks */
    }
    int64_t r = 0;  /* rows written: the pairs kept */
    for (int64_t p = 0; p < num_pairs; p++) {
        const double *d = det_kpts + pair_det[p] * 3 * num_kpts;
        const double *g = gt_kpts + pair_gt[p] * 3 * num_kpts;
        const double *box = gt_box + pair_gt[p] * 4;
        const double scale = gt_area[pair_gt[p]] + DBL_EPSILON;
        /* The tests hold where far * variance is a positive normal number; otherwise
         * (an area <= -eps, a sigma of 0 or one so small that the product is subnormal)
         * the pair gets its exponents as before. */
        const double far = reach * scale;
        const int bounded = far * narrowest >= DBL_MIN;
        const double *dr = det_reach + pair_det[p] * 4, *gr = gt_reach + pair_gt[p] * 4;
        double gap_x = dr[0] - gr[1] > gr[0] - dr[1] ? dr[0] - gr[1] : gr[0] - dr[1];
        double gap_y = dr[2] - gr[3] > gr[2] - dr[3] ? dr[2] - gr[3] : gr[2] - dr[3];
        gap_x = gap_x > 0 ? gap_x : 0;
        gap_y = gap_y > 0 ? gap_y : 0;
        if (bounded && gap_x * gap_x + gap_y * gap_y > far * widest) continue;
        double *e = exponents + r * num_kpts;
        int64_t labelled = 0;
        for (int64_t j = 0; j < num_kpts; j++) labelled += g[3 * j + 2] > 0;
        const double x0 = box[0] - box[2], x1 = box[0] + box[2] * 2;
        const double y0 = box[1] - box[3], y1 = box[1] + box[3] * 2;
        int64_t n = 0, near_any = !bounded;
        for (int64_t j = 0; j < num_kpts; j++) {  /* squared distances into e */
            double dx, dy;
            if (labelled) {
                if (!(g[3 * j + 2] > 0)) continue;
                dx = d[3 * j] - g[3 * j];
                dy = d[3 * j + 1] - g[3 * j + 1];
            } else {
                const double xd = d[3 * j], yd = d[3 * j + 1];
                dx = (x0 - xd > 0 ? x0 - xd : 0) + (xd - x1 > 0 ? xd - x1 : 0);
                dy = (y0 - yd > 0 ? y0 - yd : 0) + (yd - y1 > 0 ? yd - y1 : 0);
            }
            const double squared = dx * dx + dy * dy;
            near_any |= !(squared > far * variances[j]);  /* NaN: computed, as before */
            e[n++] = squared;
        }
        if (!near_any) continue;  /* row r is overwritten by the next pair */
        double least = 0;
        for (int64_t j = 0, k = 0; j < num_kpts; j++) {
            if (labelled && !(g[3 * j + 2] > 0)) continue;
            const double value = e[k] / variances[j] / scale / 2;
            least = k == 0 || value < least ? value : least;
            e[k++] = value;
        }
        if (least > max_exponent) continue;
        count[r] = n;
        near[r++] = p;
    }
    *num_near = r;
    return 0;
}

/* kdet_oks_exponents' reach of n keypoint rows (num_kpts x, y, v triples each) into out
 * [n, 4] (x min, x max, y min, y max): every keypoint of a detection (boxes NULL); a
 * ground truth's labelled keypoints (v > 0), or when none is, its box boxes[i] grown to
 * 3x in kdet_oks_exponents' arithmetic. A row with a NaN gets the whole plane. */
KDET_EXPORT int64_t kdet_keypoint_reach(int64_t n, const double *kpts, int64_t num_kpts,
                                        const double *boxes, double *out)
{
    for (int64_t i = 0; i < n; i++) {
        const double *k = kpts + i * 3 * num_kpts;
        double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
        int used = 0, nan = 0;
        for (int64_t j = 0; j < num_kpts; j++) {
            if (boxes && !(k[3 * j + 2] > 0)) continue;
            const double x = k[3 * j], y = k[3 * j + 1];
            nan |= x != x || y != y;
            x0 = x < x0 ? x : x0;
            x1 = x > x1 ? x : x1;
            y0 = y < y0 ? y : y0;
            y1 = y > y1 ? y : y1;
            used = 1;
        }
        if (boxes && !used) {
            const double *b = boxes + i * 4;
            x0 = b[0] - b[2];
            x1 = b[0] + b[2] * 2;
            y0 = b[1] - b[3];
            y1 = b[1] + b[3] * 2;
            nan = x0 != x0 || x1 != x1 || y0 != y0 || y1 != y1;
        }
        double *o = out + i * 4;
        o[0] = nan ? -INFINITY : x0;
        o[1] = nan ? INFINITY : x1;
        o[2] = nan ? -INFINITY : y0;
        o[3] = nan ? INFINITY : y1;
    }
    return 0;
}

/* numpy's sum of a contiguous float64 vector (pairwise_sum in loops_utils.h), so the
 * mean adds in pycocotools' order. */
static double numpy_sum(const double *a, int64_t n)
{
    if (n < 8) {
        double res = 0.;
        for (int64_t i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8];
        int64_t i;
        for (int64_t j = 0; j < 8; j++) r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int64_t j = 0; j < 8; j++) r[j] += a[i + j];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return numpy_sum(a, n2) + numpy_sum(a + n2, n - n2);
}

/* computeOks, second half: oks[p] = np.sum(exp(-e)) / len(e) over pair p's count[p]
 * values of exp_neg [num_pairs, num_kpts]; 0 where count[p] is 0. */
KDET_EXPORT int64_t kdet_oks_means(int64_t num_pairs, int64_t num_kpts, const double *exp_neg,
                                   const int64_t *count, double *oks)
{
    for (int64_t p = 0; p < num_pairs; p++)
        oks[p] = count[p] ? numpy_sum(exp_neg + p * num_kpts, count[p]) / (double)count[p] : 0.0;
    return 0;
}

/* pycocotools' accumulate: precision [T, R, K, A, M] and recall [T, K, A, M].
 *
 * order: the evaluated detections sorted by (category, score descending, image, rank),
 * pycocotools' mergesort of every image's detections concatenated in image order;
 * category k's are order[cat_bounds[k] .. cat_bounds[k + 1]]. rank[i]: the detection's
 * rank in its (image, category) group; a max-detections cut m drops ranks >= max_dets[m].
 * true_pos / false_pos: [N, A, T] (0 for ignored detections, which still add a
 * repeated (recall, precision) point). num_positives: [K, A] non-ignored ground truths.
 * Categories without ground truth in an area range stay -1. Returns 0, or -1 when out
 * of memory.
 *
 * The same numbers as pycocotools' arrays with fewer divisions: recall rc = tp / npig
 * reaches a recall threshold exactly when the integer tp reaches the least count c with
 * c / npig >= threshold (division by npig is monotone), and precision pr = tp / (fp +
 * tp + eps) only falls while tp stays, so the envelope (the maximum of pr from a point
 * on) read where tp first reaches a count is the maximum of pr over the points where tp
 * grows (and the first point): pr is computed there only.
 *
 * precision is written a few categories at a time: their cells' values go to a scratch
 * table laid out as precision's rows of the block (a few hundred KB: [T, R, block
 * cells]), then out one contiguous copy a row. Written straight, each value would land
 * 8 * K * A * M bytes from the last (96 KB at LVIS scale's 1,000 categories): a cache
 * miss per value. Cells without ground truth are set to -1 there, the others written
 * whole.
 */
KDET_EXPORT int64_t kdet_accumulate(
    int64_t num_cats, const int64_t *order, const int64_t *cat_bounds, const int64_t *rank,
    const uint8_t *true_pos, const uint8_t *false_pos, const int64_t *num_positives,
    int64_t num_areas, int64_t num_thr, const int64_t *max_dets, int64_t num_m,
    const double *rec_thr, int64_t num_rec, double *precision, double *recall)
{
    const int64_t cell_size = num_areas * num_thr;  /* one detection's flags */
    int64_t longest = 0;
    for (int64_t k = 0; k < num_cats; k++)
        if (cat_bounds[k + 1] - cat_bounds[k] > longest) longest = cat_bounds[k + 1] - cat_bounds[k];
    /* a category's detections gathered in sorted order (contiguous reads); per
     * threshold, pr where tp grows (candidates) and the tp there */
    int64_t *ranks = malloc(sizeof(int64_t) * (size_t)(longest + 1));
    uint8_t *tp_flags = malloc((size_t)((longest + 1) * cell_size));
    uint8_t *fp_flags = malloc((size_t)((longest + 1) * cell_size));
    double *pr = malloc(sizeof(double) * (size_t)((longest + 1) * num_thr));
    int64_t *pr_tp = malloc(sizeof(int64_t) * (size_t)((longest + 1) * num_thr));
    int64_t *num_pr = malloc(sizeof(int64_t) * (size_t)num_thr);
    int64_t *tp = malloc(sizeof(int64_t) * (size_t)num_thr);
    int64_t *fp = malloc(sizeof(int64_t) * (size_t)num_thr);
    int64_t *needed = malloc(sizeof(int64_t) * (size_t)num_rec);
    const int64_t cells_per_cat = num_areas * num_m, block_cats = 4;
    double *scratch = malloc(sizeof(double) * (size_t)(block_cats * cells_per_cat * num_thr *
                                                       num_rec + 1));
    int64_t status = 0;
    if (!ranks || !tp_flags || !fp_flags || !pr || !pr_tp || !num_pr || !tp || !fp || !needed ||
            !scratch) {
        status = -1;
        goto done;
    }
    const int64_t stride_r = num_cats * num_areas * num_m;  /* precision's R axis */
    for (int64_t i = 0; i < num_thr * stride_r; i++) recall[i] = -1.0;

    for (int64_t k0 = 0; k0 < num_cats; k0 += block_cats) {
        const int64_t k1 = k0 + block_cats < num_cats ? k0 + block_cats : num_cats;
        const int64_t cell0 = k0 * cells_per_cat, block_cells = (k1 - k0) * cells_per_cat;
        for (int64_t k = k0; k < k1; k++) {
            const int64_t n_all = cat_bounds[k + 1] - cat_bounds[k];
            for (int64_t s = 0; s < n_all; s++) {
                const int64_t i = order[cat_bounds[k] + s];
                ranks[s] = rank[i];
                memcpy(tp_flags + s * cell_size, true_pos + i * cell_size, (size_t)cell_size);
                memcpy(fp_flags + s * cell_size, false_pos + i * cell_size, (size_t)cell_size);
            }
            for (int64_t a = 0; a < num_areas; a++) {
                const int64_t npig = num_positives[k * num_areas + a];
                if (npig == 0) {
                    for (int64_t m = 0; m < num_m; m++) {
                        const int64_t c = (k * num_areas + a) * num_m + m - cell0;
                        for (int64_t i = 0; i < num_thr * num_rec; i++)
                            scratch[i * block_cells + c] = -1.0;
                    }
                    continue;
                }
                /* np.searchsorted(tp / npig, rec_thr, 'left') reads the first point whose tp
                 * reaches needed[q] (npig + 1: never) */
                int64_t c = 0;
                for (int64_t q = 0; q < num_rec; q++) {
                    while (c <= npig && (double)c / (double)npig < rec_thr[q]) c++;
                    needed[q] = c;
                }
                for (int64_t m = 0; m < num_m; m++) {
                    int64_t nd = 0;
                    memset(tp, 0, sizeof(int64_t) * (size_t)num_thr);
                    memset(fp, 0, sizeof(int64_t) * (size_t)num_thr);
                    memset(num_pr, 0, sizeof(int64_t) * (size_t)num_thr);
                    for (int64_t s = 0; s < n_all; s++) {
                        if (ranks[s] >= max_dets[m]) continue;
                        const uint8_t *tp_s = tp_flags + s * cell_size + a * num_thr;
                        const uint8_t *fp_s = fp_flags + s * cell_size + a * num_thr;
                        for (int64_t t = 0; t < num_thr; t++) {
                            tp[t] += tp_s[t];
                            fp[t] += fp_s[t];
                            if (tp_s[t] || nd == 0) {
                                const double tp_f = (double)tp[t], fp_f = (double)fp[t];
                                const int64_t j = t * n_all + num_pr[t]++;
                                pr[j] = tp_f / (fp_f + tp_f + DBL_EPSILON);
                                pr_tp[j] = tp[t];
                            }
                        }
                        nd++;
                    }
                    const int64_t cell = (k * num_areas + a) * num_m + m;
                    for (int64_t t = 0; t < num_thr; t++) {
                        double *pr_t = pr + t * n_all;
                        const int64_t *pr_tp_t = pr_tp + t * n_all;
                        recall[t * stride_r + cell] = nd ? (double)tp[t] / (double)npig : 0.0;
                        for (int64_t j = num_pr[t] - 1; j > 0; j--)  /* precision envelope */
                            if (pr_t[j] > pr_t[j - 1]) pr_t[j - 1] = pr_t[j];
                        int64_t j = 0;
                        double *out = scratch + t * num_rec * block_cells + (cell - cell0);
                        for (int64_t q = 0; q < num_rec; q++) {
                            while (j < num_pr[t] && pr_tp_t[j] < needed[q]) j++;
                            out[q * block_cells] = j < num_pr[t] ? pr_t[j] : 0.0;
                        }
                    }
                }
            }
        }
        for (int64_t i = 0; i < num_thr * num_rec; i++)  /* the block out, row by row */
            memcpy(precision + i * stride_r + cell0, scratch + i * block_cells,
                   sizeof(double) * (size_t)block_cells);
    }
done:
    free(ranks);
    free(tp_flags);
    free(fp_flags);
    free(pr);
    free(pr_tp);
    free(num_pr);
    free(tp);
    free(fp);
    free(needed);
    free(scratch);
    return status;
}
