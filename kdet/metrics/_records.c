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
#include <Python.h>
#include <stdint.h>

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

/* rows(records, key, width) -> float64 bytearray of n x width (each record[key] a list
 * or tuple of exactly width plain numbers) or None. */
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
        if (record == NULL || !PyDict_CheckExact(record) ||
                !read_row(PyDict_GetItemWithError(record, key), width,
                          (double *)data + i * width)) {
            PyErr_Clear();
            Py_DECREF(buffer);
            Py_RETURN_NONE;
        }
    }
    return buffer;
}

/* detections(records, image_index, category_index, row_key, width) -> (image int64,
 * category int64, score float64, rows float64 n x width) bytearrays, each record visited
 * once ("image_id", "category_id", "score", row_key; row_key None: no rows, width 0), or
 * None. */
static PyObject *detections(PyObject *self, PyObject *args) {
    PyObject *records, *image_index, *category_index, *row_key;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "OOOOn", &records, &image_index, &category_index, &row_key,
                          &width) || !check_records(records)) return NULL;
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
    PyObject *result = NULL;
    if (!image_key || !category_key || !score_key || !image || !category || !score || !row)
        goto done;  /* an exception is set */
    int64_t *image_out = (int64_t *)image_data, *category_out = (int64_t *)category_data;
    double *score_out = (double *)score_data, *row_out = (double *)row_data;
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
    }
    result = Py_BuildValue("(OOOO)", image, category, score, row);
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
    return result;
}

static PyMethodDef methods[] = {
    {"detections", detections, METH_VARARGS,
     "detections(records, image_index, category_index, row_key, width): (image, category, "
     "score, rows) bytearrays, or None"},
    {"rows", rows, METH_VARARGS,
     "rows(records, key, width): float64 bytearray of len(records) x width, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_records",
    "Columns of COCO result dicts read in C (kdet.metrics.coco's fast path).", -1, methods,
};

PyMODINIT_FUNC PyInit__records(void) { return PyModule_Create(&module); }
