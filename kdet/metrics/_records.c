/* Columns of COCO result dicts, read in C: the evaluator's fast path for
 * COCOEvaluator.add_detections (kdet/metrics/coco.py, via kdet.metrics.native).
 *
 * Python's stable ABI only (Py_LIMITED_API 3.10: one build serves every later
 * Python). detections() reads each record's ids, score and box (one visit per
 * record), rows() one key's rows (keypoints); each returns bytearrays of int64 /
 * float64 values, or None as soon as a record is not of the plain form: not exactly
 * a dict, a key missing, a value of another type (a bool, a numpy scalar, a string
 * where a number belongs), a row of another length, an id not in the index, an int
 * beyond float range. The caller then reads the records in Python, which raises
 * naming the first bad record; so this code only recognises the plain form, never
 * words an error. Numbers convert as Python's float() does.
 */
#define Py_LIMITED_API 0x030A0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* A plain number (exact int or float) as a double; 0 on failure (no exception left). */
static int as_double(PyObject *value, double *out) {
    if (PyFloat_CheckExact(value)) {
        *out = PyFloat_AsDouble(value);
        return 1;
    }
    if (PyLong_CheckExact(value)) {
        double d = PyLong_AsDouble(value);
        if (d == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        *out = d;
        return 1;
    }
    return 0;
}

static PyObject *new_buffer(Py_ssize_t count, Py_ssize_t itemsize, char **data) {
    PyObject *buffer = PyByteArray_FromStringAndSize(NULL, count * itemsize);
    if (buffer != NULL) *data = PyByteArray_AsString(buffer);
    return buffer;
}

static int check_records(PyObject *records) {
    if (!PyList_CheckExact(records)) {
        PyErr_SetString(PyExc_TypeError, "records must be a list");
        return 0;
    }
    return 1;
}

/* One record's id: index[record[key]] for an exact int, str or float; -1 if not plain. */
static long long index_of(PyObject *record, PyObject *key, PyObject *index) {
    PyObject *value = PyDict_GetItemWithError(record, key);
    if (value == NULL || !(PyLong_CheckExact(value) || PyUnicode_CheckExact(value) ||
                           PyFloat_CheckExact(value))) return -1;
    PyObject *position = PyDict_GetItemWithError(index, value);
    if (position == NULL || !PyLong_CheckExact(position)) return -1;
    return PyLong_AsLongLong(position);
}

/* A list or tuple of exactly width plain numbers into out; 0 if not plain. */
static int read_row(PyObject *row, Py_ssize_t width, double *out) {
    int is_list = row != NULL && PyList_CheckExact(row);
    if (row == NULL || !(is_list || PyTuple_CheckExact(row))) return 0;
    if ((is_list ? PyList_Size(row) : PyTuple_Size(row)) != width) return 0;
    for (Py_ssize_t j = 0; j < width; j++) {
        PyObject *item = is_list ? PyList_GetItem(row, j) : PyTuple_GetItem(row, j);
        if (item == NULL || !as_double(item, out + j)) return 0;
    }
    return 1;
}

/* rows(records, key, width) -> float64 bytearray of n x width (each record[key], or with
 * key None each record itself, a list or tuple of exactly width plain numbers) or None. */
static PyObject *rows(PyObject *self, PyObject *args) {
    PyObject *records, *key;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "OOn", &records, &key, &width) || !check_records(records))
        return NULL;
    Py_ssize_t n = PyList_Size(records);
    char *data;
    PyObject *buffer = new_buffer(n * width, sizeof(double), &data);
    if (buffer == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *record = PyList_GetItem(records, i);
        PyObject *row = key == Py_None ? record : NULL;
        if (row == NULL && record != NULL && PyDict_CheckExact(record))
            row = PyDict_GetItemWithError(record, key);
        if (!read_row(row, width, (double *)data + i * width)) {
            PyErr_Clear();
            Py_DECREF(buffer);
            Py_RETURN_NONE;
        }
    }
    return buffer;
}

/* detections(records, image_index, category_index, row_key, width[, box_key, flag_keys])
 * -> (image int64, category int64, score float64, rows float64 n x width, boxes, flags):
 * bytearrays, each record visited once ("image_id", "category_id", "score", row_key;
 * row_key None: no rows, width 0), or None. With box_key (not None) boxes is a float64
 * n x 4 bytearray of each record[box_key] when every record holds a plain one, else None
 * (the caller reads them in Python; the other columns stand); without it None. flags:
 * for each of the (at most 4) keys of the tuple flag_keys, whether any record holds it
 * (flag_keys None: an empty tuple). */
static PyObject *detections(PyObject *self, PyObject *args) {
    PyObject *records, *image_index, *category_index, *row_key;
    PyObject *box_key = Py_None, *flag_keys = Py_None;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "OOOOn|OO", &records, &image_index, &category_index, &row_key,
                          &width, &box_key, &flag_keys) || !check_records(records)) return NULL;
    Py_ssize_t num_flags = flag_keys == Py_None ? 0 : -1;
    if (flag_keys != Py_None && PyTuple_CheckExact(flag_keys)) num_flags = PyTuple_Size(flag_keys);
    if (num_flags < 0 || num_flags > 4) {
        PyErr_SetString(PyExc_TypeError, "flag_keys must be None or a tuple of at most 4 keys");
        return NULL;
    }
    int flags[4] = {0, 0, 0, 0};
    if (!PyDict_CheckExact(image_index) || !PyDict_CheckExact(category_index)) {
        PyErr_SetString(PyExc_TypeError, "the indices must be dicts");
        return NULL;
    }
    if (row_key == Py_None) width = 0;
    PyObject *image_key = PyUnicode_FromString("image_id");
    PyObject *category_key = PyUnicode_FromString("category_id");
    PyObject *score_key = PyUnicode_FromString("score");
    Py_ssize_t n = PyList_Size(records);
    char *image_data = NULL, *category_data = NULL, *score_data = NULL, *row_data = NULL;
    PyObject *image = new_buffer(n, sizeof(int64_t), &image_data);
    PyObject *category = new_buffer(n, sizeof(int64_t), &category_data);
    PyObject *score = new_buffer(n, sizeof(double), &score_data);
    PyObject *row = new_buffer(n * width, sizeof(double), &row_data);
    char *box_data = NULL;
    int boxes_plain = box_key != Py_None;
    PyObject *box = boxes_plain ? new_buffer(4 * n, sizeof(double), &box_data) : NULL;
    PyObject *result = NULL;
    if (!image_key || !category_key || !score_key || !image || !category || !score || !row ||
            (boxes_plain && !box))
        goto done;  /* an exception is set */
    int64_t *image_out = (int64_t *)image_data, *category_out = (int64_t *)category_data;
    double *score_out = (double *)score_data, *row_out = (double *)row_data;
    double *box_out = (double *)box_data;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *record = PyList_GetItem(records, i);
        if (record == NULL || !PyDict_CheckExact(record)) goto not_plain;
        long long k = index_of(record, image_key, image_index);
        long long c = index_of(record, category_key, category_index);
        if (k < 0 || c < 0) goto not_plain;
        image_out[i] = (int64_t)k;
        category_out[i] = (int64_t)c;
        PyObject *value = PyDict_GetItemWithError(record, score_key);
        if (value == NULL || !as_double(value, score_out + i)) goto not_plain;
        if (width && !read_row(PyDict_GetItemWithError(record, row_key), width,
                               row_out + i * width)) goto not_plain;
        if (boxes_plain && !read_row(PyDict_GetItemWithError(record, box_key), 4,
                                     box_out + 4 * i)) {
            PyErr_Clear();
            boxes_plain = 0;
        }
        for (Py_ssize_t f = 0; f < num_flags; f++) {
            if (flags[f]) continue;
            int holds = PyDict_Contains(record, PyTuple_GetItem(flag_keys, f));
            if (holds < 0) goto not_plain;  /* an unhashable key: the caller's mistake */
            flags[f] = holds;
        }
    }
    PyObject *flag_tuple = PyTuple_New(num_flags);
    if (flag_tuple == NULL) goto done;
    for (Py_ssize_t f = 0; f < num_flags; f++) {
        PyObject *value = flags[f] ? Py_True : Py_False;
        Py_INCREF(value);
        PyTuple_SetItem(flag_tuple, f, value);  /* steals the reference */
    }
    result = Py_BuildValue("(OOOOON)", image, category, score, row,
                           boxes_plain ? box : Py_None, flag_tuple);
    goto done;
not_plain:
    PyErr_Clear();
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(image_key);
    Py_XDECREF(category_key);
    Py_XDECREF(score_key);
    Py_XDECREF(image);
    Py_XDECREF(category);
    Py_XDECREF(score);
    Py_XDECREF(row);
    Py_XDECREF(box);
    return result;
}

/* A growable buffer of bytes (malloc'd; copied into a bytearray at the end). */
typedef struct {
    char *data;
    Py_ssize_t size, room;
} Growing;

static int grow(Growing *g, Py_ssize_t more) {
    if (g->size + more <= g->room) return 1;
    Py_ssize_t room = g->room ? 2 * g->room : 1 << 16;
    while (room < g->size + more) room *= 2;
    char *data = PyMem_Realloc(g->data, room);
    if (data == NULL) return 0;
    g->data = data;
    g->room = room;
    return 1;
}

static int append(Growing *g, const void *bytes, Py_ssize_t count) {
    if (!grow(g, count)) return 0;
    memcpy(g->data + g->size, bytes, count);
    g->size += count;
    return 1;
}

/* segmentation["size"] is a list or tuple of two exact ints equal to height, width. */
static int size_is(PyObject *segmentation, PyObject *size_key, long long height,
                   long long width) {
    PyObject *size = PyDict_GetItemWithError(segmentation, size_key);
    if (size == NULL) return 0;
    int is_list = PyList_CheckExact(size);
    if (!(is_list || PyTuple_CheckExact(size)) ||
            (is_list ? PyList_Size(size) : PyTuple_Size(size)) != 2) return 0;
    long long hw[2];
    for (Py_ssize_t j = 0; j < 2; j++) {
        PyObject *item = is_list ? PyList_GetItem(size, j) : PyTuple_GetItem(size, j);
        int overflow = 0;
        if (item == NULL || !PyLong_CheckExact(item)) return 0;
        hw[j] = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (overflow || (hw[j] == -1 && PyErr_Occurred())) return 0;
    }
    return hw[0] == height && hw[1] == width;
}

/* A segmentation's polygons appended to coords / polygon_ends when they are plain (a
 * non-empty list of lists of exact ints / floats, the first longer than 4, every value
 * within +-limit: what kdet.metrics.coco._plain_polygons and its range check accept);
 * the number of polygons, or 0 (nothing appended). */
static Py_ssize_t read_polygons(PyObject *segmentation, double limit, Growing *coords,
                                Growing *polygon_ends) {
    Py_ssize_t num = PyList_Size(segmentation);
    Py_ssize_t coords_before = coords->size, ends_before = polygon_ends->size;
    if (num <= 0) return 0;
    for (Py_ssize_t j = 0; j < num; j++) {
        PyObject *polygon = PyList_GetItem(segmentation, j);
        if (polygon == NULL || !PyList_CheckExact(polygon)) goto not_plain;
        Py_ssize_t length = PyList_Size(polygon);
        if (j == 0 && length <= 4) goto not_plain;  /* pycocotools reads 4 values as a box */
        if (!grow(coords, length * (Py_ssize_t)sizeof(double))) goto not_plain;
        double *out = (double *)(coords->data + coords->size);
        for (Py_ssize_t k = 0; k < length; k++) {
            PyObject *item = PyList_GetItem(polygon, k);
            if (item == NULL || !as_double(item, out + k) ||
                    !(out[k] <= limit && out[k] >= -limit)) goto not_plain;  /* NaN too */
        }
        coords->size += length * (Py_ssize_t)sizeof(double);
        int64_t end = (int64_t)(coords->size / (Py_ssize_t)sizeof(double));
        if (!append(polygon_ends, &end, sizeof(end))) goto not_plain;
    }
    return num;
not_plain:
    PyErr_Clear();
    coords->size = coords_before;
    polygon_ends->size = ends_before;
    return 0;
}

/* segmentations(items, key, heights, widths) -> (kinds, text, text_ends, coords,
 * polygon_ends, polygons_per_mask): the masks of a list, each items[i][key] (key None:
 * items[i] itself) of an image of heights[i] x widths[i] pixels (int64 bytes), sorted
 * by kind (uint8 bytes, one per item):
 *   0  a compressed RLE: an exact dict with exact str / bytes "counts" (ASCII / UTF-8)
 *      and a "size" of two exact ints equal to the image's; the strings back to back in
 *      text, string j ending at text_ends[j] (int64);
 *   1  plain polygons (read_polygons): their values back to back in coords (float64),
 *      polygon p ending at polygon_ends[p] (int64, in values), mask j of
 *      polygons_per_mask[j] (int64) polygons;
 *   2  anything else (or item not an exact dict holding key): for the caller's Python
 *      reading, which converts odd input or raises naming the record.
 * Only plain input is recognised here; nothing is judged valid beyond its form (the
 * strings are checked by kdet_rle_check). */
static PyObject *segmentations(PyObject *self, PyObject *args) {
    PyObject *items, *key, *heights_bytes, *widths_bytes;
    if (!PyArg_ParseTuple(args, "OOSS", &items, &key, &heights_bytes, &widths_bytes) ||
            !check_records(items)) return NULL;
    Py_ssize_t n = PyList_Size(items);
    if (PyBytes_Size(heights_bytes) != n * 8 || PyBytes_Size(widths_bytes) != n * 8) {
        PyErr_SetString(PyExc_ValueError, "heights / widths must be int64 bytes, one a record");
        return NULL;
    }
    const int64_t *heights = (const int64_t *)PyBytes_AsString(heights_bytes);
    const int64_t *widths = (const int64_t *)PyBytes_AsString(widths_bytes);
    PyObject *counts_key = PyUnicode_FromString("counts");
    PyObject *size_key = PyUnicode_FromString("size");
    PyObject *kinds = PyBytes_FromStringAndSize(NULL, n);
    /* the strings are noted (held, with their characters' address and length) and
     * copied once, after the loop, into one bytes object of the total length */
    PyObject **held = PyMem_Calloc(n ? n : 1, sizeof(PyObject *));
    const char **string_chars = PyMem_Malloc((n ? n : 1) * sizeof(char *));
    PyObject *text = NULL;
    Py_ssize_t num_strings = 0, text_size = 0;
    Growing text_ends = {0}, coords = {0}, polygon_ends = {0}, per_mask = {0};
    PyObject *result = NULL;
    if (counts_key == NULL || size_key == NULL || kinds == NULL || held == NULL ||
            string_chars == NULL) {
        if (held == NULL || string_chars == NULL) PyErr_NoMemory();
        goto done;
    }
    char *kind = PyBytes_AsString(kinds);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *segmentation = PyList_GetItem(items, i);
        kind[i] = 2;
        if (key != Py_None) {
            if (!PyDict_CheckExact(segmentation)) continue;
            segmentation = PyDict_GetItemWithError(segmentation, key);
            if (segmentation == NULL) {
                PyErr_Clear();
                continue;
            }
        }
        if (PyDict_CheckExact(segmentation)) {
            PyObject *counts = PyDict_GetItemWithError(segmentation, counts_key);
            const char *chars = NULL;
            Py_ssize_t length = 0;
            if (counts == NULL) {
                PyErr_Clear();
                continue;
            }
            Py_INCREF(counts);  /* alive while read, whatever the size lookup runs */
            int ok = size_is(segmentation, size_key, heights[i], widths[i]);
            if (ok && PyUnicode_CheckExact(counts))
                ok = (chars = PyUnicode_AsUTF8AndSize(counts, &length)) != NULL;
            else if (ok && PyBytes_CheckExact(counts))
                ok = PyBytes_AsStringAndSize(counts, (char **)&chars, &length) == 0;
            else
                ok = 0;
            PyErr_Clear();
            int64_t end = (int64_t)(text_size + length);
            if (ok && !append(&text_ends, &end, sizeof(end))) {
                Py_DECREF(counts);
                PyErr_NoMemory();
                goto done;
            }
            if (ok) {
                kind[i] = 0;
                held[num_strings] = counts;  /* the reference taken above */
                string_chars[num_strings++] = chars;
                text_size += length;
            } else {
                Py_DECREF(counts);
            }
        } else if (PyList_CheckExact(segmentation)) {
            double side = (double)(heights[i] > widths[i] ? heights[i] : widths[i]);
            Py_ssize_t num = read_polygons(segmentation, 4.0 * side + 1000.0, &coords,
                                           &polygon_ends);
            int64_t count = (int64_t)num;
            if (num > 0 && append(&per_mask, &count, sizeof(count))) kind[i] = 1;
            else if (num > 0) {  /* out of memory after the polygons went in */
                PyErr_NoMemory();
                goto done;
            }
        }
    }
    text = PyBytes_FromStringAndSize(NULL, text_size);
    if (text == NULL) goto done;
    char *text_chars = PyBytes_AsString(text);
    if (text_chars == NULL) goto done;
    const int64_t *ends = (const int64_t *)text_ends.data;
    for (Py_ssize_t j = 0; j < num_strings; j++) {
        const int64_t start = j ? ends[j - 1] : 0;
        memcpy(text_chars + start, string_chars[j], (size_t)(ends[j] - start));
    }
    result = Py_BuildValue("(OOy#y#y#y#)", kinds, text,
                           text_ends.data ? text_ends.data : "", text_ends.size,
                           coords.data ? coords.data : "", coords.size,
                           polygon_ends.data ? polygon_ends.data : "", polygon_ends.size,
                           per_mask.data ? per_mask.data : "", per_mask.size);
done:
    Py_XDECREF(counts_key);
    Py_XDECREF(size_key);
    Py_XDECREF(kinds);
    Py_XDECREF(text);
    for (Py_ssize_t j = 0; j < num_strings; j++) Py_DECREF(held[j]);
    PyMem_Free(held);
    PyMem_Free(string_chars);
    PyMem_Free(text_ends.data);
    PyMem_Free(coords.data);
    PyMem_Free(polygon_ends.data);
    PyMem_Free(per_mask.data);
    return result;
}

static PyMethodDef methods[] = {
    {"detections", detections, METH_VARARGS,
     "detections(records, image_index, category_index, row_key, width): (image, category, "
     "score, rows) bytearrays, or None"},
    {"rows", rows, METH_VARARGS,
     "rows(records, key, width): float64 bytearray of len(records) x width, or None"},
    {"segmentations", segmentations, METH_VARARGS,
     "segmentations(items, key, heights, widths): (kinds, text, text_ends, coords, "
     "polygon_ends, polygons_per_mask) bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_records",
    "Columns of COCO result dicts read in C (kdet.metrics.coco's fast path).", -1, methods,
};

PyMODINIT_FUNC PyInit__records(void) { return PyModule_Create(&module); }
