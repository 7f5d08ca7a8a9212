/*
 * The per-row lane's graph-evaluation callback (llama.cpp's cb_eval), compiled.
 *
 * llama.cpp's scheduler asks the callback about every node of every graph it computes, on the
 * thread that drives the computation while its worker threads wait. Written in Python, each question
 * took the GIL, so a busy event loop stalled the decode; here nothing takes the GIL, and a decode
 * runs without it from start to end. What the callback does for one decode is described by a
 * `row_callback_plan` that row_callback.py fills in before llama_decode:
 *
 *   - additions: block -> [rows, n_embd] floats added to that block's output ("l_out-N"), one row
 *     per batch row (the last block keeps only the rows that ask for logits: `output_rows` picks
 *     their additions);
 *   - edits: block -> rounds of per-row edits of that block's output along a unit direction, after
 *     the additions (server/steering/operators.py): the projection p = h . u becomes
 *     clamp((1 - alpha) p, low, high); per round, [rows, n_embd] units and [rows, 4] parameters
 *     (active, alpha, low, high), a row with active 0 left as it is;
 *   - reading: blocks 0..read_blocks-1 copied out at `read_rows` (after the additions, as the HF
 *     engine's hooks read), into `read_out` [n_read, read_blocks, n_embd];
 *   - stop_after_block: returning false once that block is done ends the graph there (a capture
 *     needs no later block and no output layer).
 *
 * The module is also a (method-less) Python extension so that setuptools builds it at install
 * time like any other; Python loads it with ctypes and passes the function's address to llama.cpp.
 * The ggml accessors come from the libggml-base that llama-cpp-python ships, by address, so this
 * file needs no ggml header and links against nothing but libc.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

typedef const char *(*tensor_name_fn)(const void *tensor);
typedef float *(*tensor_data_fn)(const void *tensor);
typedef int64_t (*tensor_count_fn)(const void *tensor);

enum { MAX_BLOCKS = 1024 };

enum row_callback_error {
    ROW_CALLBACK_OK = 0,
    ROW_CALLBACK_ROWS_MISMATCH = 1 /* a block output had neither every row nor the logits rows */
};

typedef struct {
    tensor_name_fn tensor_name;
    tensor_data_fn tensor_data;
    tensor_count_fn tensor_count;
    int64_t n_embd;
    int32_t n_blocks;           /* length of `additions` */
    int32_t active;             /* 0: observe nothing this decode */
    int64_t batch_rows;         /* tokens in this decode */
    int64_t n_outputs;          /* rows that ask for logits */
    const int64_t *output_rows; /* [n_outputs], ascending */
    float *const *additions;    /* [n_blocks]: NULL, or [batch_rows, n_embd] */
    float *const *edit_units;   /* [n_blocks]: NULL, or [edit_rounds[block], batch_rows, n_embd] */
    float *const *edit_params;  /* [n_blocks]: NULL, or [edit_rounds[block], batch_rows, 4] */
    const int32_t *edit_rounds; /* [n_blocks] */
    int32_t read_blocks;        /* read blocks 0..read_blocks-1 */
    int64_t n_read;
    const int64_t *read_rows;   /* [n_read]: batch rows */
    const int64_t *read_output; /* [n_read]: the same rows' places among the output rows */
    float *read_out;            /* [n_read, read_blocks, n_embd] */
    int32_t stop_after_block;   /* -1: compute the whole graph */
    int32_t error;              /* enum row_callback_error, for Python to raise */
    int32_t error_block;
} row_callback_plan;

/* block N for llama.cpp's "l_out-N" (a block's output, after its control vector), else -1. */
static int32_t block_of(const char *name) {
    static const char prefix[] = "l_out-";
    if (name == NULL || strncmp(name, prefix, sizeof(prefix) - 1) != 0) {
        return -1;
    }
    const char *digits = name + sizeof(prefix) - 1;
    if (*digits == '\0') {
        return -1;
    }
    int32_t block = 0;
    for (; *digits != '\0'; ++digits) {
        if (*digits < '0' || *digits > '9' || block >= MAX_BLOCKS) {
            return -1;
        }
        block = block * 10 + (*digits - '0');
    }
    return block;
}

static bool wanted(const row_callback_plan *plan, int32_t block) {
    if (block < 0) {
        return false;
    }
    return (block < plan->n_blocks && (plan->additions[block] != NULL || plan->edit_units[block] != NULL)) ||
           block < plan->read_blocks || block == plan->stop_after_block;
}

/* One row's edit: only a projection the edit moves changes the row (a cap it does not reach adds
   nothing, bit for bit). */
static void edit_row(float *target, const float *unit, const float *params, int64_t width) {
    if (params[0] == 0.0f) {
        return;
    }
    double projection = 0.0;
    for (int64_t i = 0; i < width; ++i) {
        projection += (double)target[i] * (double)unit[i];
    }
    double wanted = (1.0 - (double)params[1]) * projection;
    if (wanted < (double)params[2]) {
        wanted = (double)params[2];
    }
    if (wanted > (double)params[3]) {
        wanted = (double)params[3];
    }
    if (wanted == projection) {
        return;
    }
    const double change = wanted - projection;
    for (int64_t i = 0; i < width; ++i) {
        target[i] += (float)(change * (double)unit[i]);
    }
}

static void edit_rows(const row_callback_plan *plan, int32_t block, float *output, bool logits_only) {
    const int64_t rows = logits_only ? plan->n_outputs : plan->batch_rows;
    for (int32_t round = 0; round < plan->edit_rounds[block]; ++round) {
        const float *units = plan->edit_units[block] + (int64_t)round * plan->batch_rows * plan->n_embd;
        const float *params = plan->edit_params[block] + (int64_t)round * plan->batch_rows * 4;
        for (int64_t row = 0; row < rows; ++row) {
            const int64_t source = logits_only ? plan->output_rows[row] : row;
            edit_row(output + row * plan->n_embd, units + source * plan->n_embd, params + source * 4, plan->n_embd);
        }
    }
}

static void add_rows(const row_callback_plan *plan, const float *additions, float *output, bool logits_only) {
    const int64_t rows = logits_only ? plan->n_outputs : plan->batch_rows;
    for (int64_t row = 0; row < rows; ++row) {
        const float *source = additions + (logits_only ? plan->output_rows[row] : row) * plan->n_embd;
        float *target = output + row * plan->n_embd;
        for (int64_t i = 0; i < plan->n_embd; ++i) {
            target[i] += source[i];
        }
    }
}

static void read_rows(const row_callback_plan *plan, int32_t block, const float *output, bool logits_only) {
    const int64_t width = plan->n_embd;
    for (int64_t k = 0; k < plan->n_read; ++k) {
        const int64_t row = logits_only ? plan->read_output[k] : plan->read_rows[k];
        float *target = plan->read_out + (k * plan->read_blocks + block) * width;
        memcpy(target, output + row * width, (size_t)width * sizeof(float));
    }
}

/* ggml_backend_sched_eval_callback: (tensor, ask, user_data) -> bool. */
bool persona_row_callback(void *tensor, bool ask, void *user_data) {
    row_callback_plan *plan = (row_callback_plan *)user_data;
    if (plan == NULL || !plan->active) {
        return !ask; /* observe nothing; told a node is done, go on */
    }
    const int32_t block = block_of(plan->tensor_name(tensor));
    if (ask) {
        return wanted(plan, block);
    }
    if (block < 0) {
        return true;
    }
    const int64_t rows = plan->tensor_count(tensor) / plan->n_embd;
    bool logits_only;
    if (rows == plan->batch_rows) {
        logits_only = false;
    } else if (rows == plan->n_outputs) { /* the last block keeps only the rows with logits */
        logits_only = true;
    } else {
        plan->error = ROW_CALLBACK_ROWS_MISMATCH;
        plan->error_block = block;
        return false; /* stops the graph: decode() raises */
    }
    float *output = plan->tensor_data(tensor);
    if (block < plan->n_blocks && plan->additions[block] != NULL) {
        add_rows(plan, plan->additions[block], output, logits_only);
    }
    if (block < plan->n_blocks && plan->edit_units[block] != NULL) {
        edit_rows(plan, block, output, logits_only);
    }
    if (block < plan->read_blocks) {
        read_rows(plan, block, output, logits_only);
    }
    return block != plan->stop_after_block;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_row_callback", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__row_callback(void) { return PyModule_Create(&module); }
