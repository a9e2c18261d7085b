/*
 * classify: runs a one-input float32 model through kiln's C API (libkiln.so).
 *
 *   classify [--profile MIN OPT MAX] [--save PLAN] MODEL INPUT.npy [EXPECTED.npy]
 *
 * MODEL is an ONNX file (built here; --profile adds an optimization profile written like
 * the CLI's --min/--opt/--max-shapes, --save writes the plan) or a .plan file (loaded).
 * INPUT.npy is a float32, C-order .npy file. The program checks that the header's version
 * macros equal kiln_get_version(), sets the input shape from the file, runs, prints the
 * first output's shape and per-row argmax, and, given EXPECTED.npy, exits 1 unless the
 * output's relative L2 error against it is at most 1e-4. Any kiln error exits 1 with
 * kiln_last_error().
 *
 * Build: cc -std=c99 -Iinclude classify.c -Ltarget/release -lkiln -lm -o classify
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kiln.h"

#define MAX_RANK 8

/* Stops with kiln's message when a call fails. */
static void check(KilnStatus status, const char *what) {
    if (status != KILN_STATUS_OK) {
        fprintf(stderr, "error: %s failed (status %d): %s\n", what, (int)status, kiln_last_error());
        exit(1);
    }
}

typedef struct {
    int64_t shape[MAX_RANK];
    size_t rank;
    size_t count;
    float *data;
} Array;

/* Reads a little-endian float32, C-order .npy file (format versions 1 to 3). */
static int read_npy(const char *path, Array *out) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "error: cannot open %s\n", path);
        return 0;
    }
    unsigned char magic[8];
    if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "\x93NUMPY", 6) != 0) {
        fprintf(stderr, "error: %s is not a .npy file\n", path);
        fclose(f);
        return 0;
    }
    size_t header_len = 0;
    if (magic[6] == 1) {
        unsigned char b[2];
        if (fread(b, 1, 2, f) != 2) goto bad;
        header_len = (size_t)b[0] | ((size_t)b[1] << 8);
    } else {
        unsigned char b[4];
        if (fread(b, 1, 4, f) != 4) goto bad;
        header_len = (size_t)b[0] | ((size_t)b[1] << 8) | ((size_t)b[2] << 16) | ((size_t)b[3] << 24);
    }
    char *header = calloc(header_len + 1, 1);
    if (!header || fread(header, 1, header_len, f) != header_len) {
        free(header);
        goto bad;
    }
    if (!strstr(header, "'<f4'") || !strstr(header, "'fortran_order': False")) {
        fprintf(stderr, "error: %s: only little-endian float32 C-order arrays are supported\n", path);
        free(header);
        fclose(f);
        return 0;
    }
    const char *p = strstr(header, "'shape': (");
    if (!p) {
        free(header);
        goto bad;
    }
    p += strlen("'shape': (");
    out->rank = 0;
    out->count = 1;
    while (*p && *p != ')') {
        char *end;
        long long d = strtoll(p, &end, 10);
        if (end == p) {
            p++;
            continue;
        }
        if (out->rank == MAX_RANK || d < 0) {
            free(header);
            goto bad;
        }
        out->shape[out->rank++] = d;
        out->count *= (size_t)d;
        p = end;
    }
    free(header);
    out->data = malloc(out->count * sizeof(float) + 1);
    if (!out->data || fread(out->data, sizeof(float), out->count, f) != out->count) goto bad;
    fclose(f);
    return 1;
bad:
    fprintf(stderr, "error: %s: malformed .npy file\n", path);
    fclose(f);
    return 0;
}

int main(int argc, char **argv) {
    const char *profile[3] = {NULL, NULL, NULL};
    const char *save = NULL;
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--profile") == 0 && i + 3 < argc) {
            profile[0] = argv[++i];
            profile[1] = argv[++i];
            profile[2] = argv[++i];
        } else if (strcmp(argv[i], "--save") == 0 && i + 1 < argc) {
            save = argv[++i];
        } else {
            break;
        }
    }
    if (argc - i < 2) {
        fprintf(stderr, "usage: %s [--profile MIN OPT MAX] [--save PLAN] MODEL INPUT.npy [EXPECTED.npy]\n",
                argv[0]);
        return 2;
    }
    const char *model = argv[i], *input_path = argv[i + 1];
    const char *expected_path = argc - i > 2 ? argv[i + 2] : NULL;

    /* 1. The header and the library must be the same version. */
    printf("kiln header %d.%d.%d (KILN_VERSION %d), library %u (%s)\n", KILN_VERSION_MAJOR,
           KILN_VERSION_MINOR, KILN_VERSION_PATCH, KILN_VERSION, kiln_get_version(),
           kiln_get_version_string());
    if (kiln_get_version() != KILN_VERSION) {
        fprintf(stderr, "error: header version %d != library version %u\n", KILN_VERSION,
                kiln_get_version());
        return 1;
    }
    /* Bad arguments are errors, not crashes. */
    KilnEngine *engine = NULL;
    if (kiln_engine_load_plan(NULL, &engine) != KILN_STATUS_NULL_POINTER || kiln_last_error()[0] == 0) {
        fprintf(stderr, "error: a NULL path was not reported as KILN_STATUS_NULL_POINTER\n");
        return 1;
    }

    /* 2. Build from ONNX (with an optional profile) or load a plan. */
    size_t len = strlen(model);
    if (len > 5 && strcmp(model + len - 5, ".plan") == 0) {
        check(kiln_engine_load_plan(model, &engine), "kiln_engine_load_plan");
    } else {
        KilnBuildConfig *config = NULL;
        check(kiln_build_config_create(&config), "kiln_build_config_create");
        check(kiln_build_config_set_device(config, "cpu"), "kiln_build_config_set_device");
        if (profile[0]) {
            check(kiln_build_config_add_profile(config, profile[0], profile[1], profile[2]),
                  "kiln_build_config_add_profile");
        }
        check(kiln_engine_build_onnx(model, config, &engine), "kiln_engine_build_onnx");
        kiln_build_config_destroy(config);
    }
    if (save) check(kiln_engine_save_plan(engine, save), "kiln_engine_save_plan");
    size_t n_inputs = 0, n_outputs = 0, n_profiles = 0;
    check(kiln_engine_num_inputs(engine, &n_inputs), "kiln_engine_num_inputs");
    check(kiln_engine_num_outputs(engine, &n_outputs), "kiln_engine_num_outputs");
    check(kiln_engine_num_profiles(engine, &n_profiles), "kiln_engine_num_profiles");
    if (n_inputs != 1 || n_outputs < 1) {
        fprintf(stderr, "error: this example runs models with one input (got %zu)\n", n_inputs);
        return 1;
    }
    const char *in_name = NULL, *out_name = NULL;
    check(kiln_engine_input_name(engine, 0, &in_name), "kiln_engine_input_name");
    check(kiln_engine_output_name(engine, 0, &out_name), "kiln_engine_output_name");
    KilnDataType in_type, out_type;
    check(kiln_engine_tensor_dtype(engine, in_name, &in_type), "kiln_engine_tensor_dtype");
    check(kiln_engine_tensor_dtype(engine, out_name, &out_type), "kiln_engine_tensor_dtype");
    if (in_type != KILN_DATA_TYPE_FLOAT32 || out_type != KILN_DATA_TYPE_FLOAT32) {
        fprintf(stderr, "error: this example needs a float32 input and output\n");
        return 1;
    }
    printf("engine: input %s, output %s, %zu optimization profile(s)\n", in_name, out_name, n_profiles);

    /* 3. A context: set the input shape, bind the buffer, run. */
    Array x;
    if (!read_npy(input_path, &x)) return 1;
    KilnContext *ctx = NULL;
    check(kiln_context_create(engine, &ctx), "kiln_context_create");
    if (n_profiles > 0) {
        /* A shape past the profile's largest is refused, naming the range. */
        int64_t big[MAX_RANK];
        memcpy(big, x.shape, sizeof(big));
        big[0] = 1000000;
        KilnStatus s = kiln_context_set_input_shape(ctx, in_name, big, x.rank);
        if (s != KILN_STATUS_SHAPE_OUTSIDE_PROFILE) {
            fprintf(stderr, "error: a shape outside the profile gave status %d\n", (int)s);
            return 1;
        }
        printf("outside the profile: %s\n", kiln_last_error());
    }
    check(kiln_context_set_input_shape(ctx, in_name, x.shape, x.rank), "kiln_context_set_input_shape");
    check(kiln_context_bind_input(ctx, in_name, x.data, x.count * sizeof(float)), "kiln_context_bind_input");
    check(kiln_context_execute(ctx), "kiln_context_execute");

    /* 4. Read the output: query its shape, copy it out. */
    int64_t shape[MAX_RANK];
    size_t rank = 0, count = 1;
    check(kiln_context_get_tensor_shape(ctx, out_name, shape, MAX_RANK, &rank), "kiln_context_get_tensor_shape");
    printf("output %s shape [", out_name);
    for (size_t d = 0; d < rank; d++) {
        printf(d ? ", %lld" : "%lld", (long long)shape[d]);
        count *= (size_t)shape[d];
    }
    printf("]\n");
    float *y = malloc(count * sizeof(float) + 1);
    check(kiln_context_read_output(ctx, out_name, y, count * sizeof(float)), "kiln_context_read_output");
    size_t row = rank > 0 && shape[rank - 1] > 0 ? (size_t)shape[rank - 1] : 1;
    for (size_t r = 0; r * row < count; r++) {
        size_t best = 0;
        for (size_t k = 1; k < row; k++)
            if (y[r * row + k] > y[r * row + best]) best = k;
        printf("row %zu: argmax %zu (%.6f)\n", r, best, y[r * row + best]);
    }

    /* 5. Compare with the expected output. */
    int status = 0;
    if (expected_path) {
        Array want;
        if (!read_npy(expected_path, &want)) return 1;
        if (want.count != count) {
            fprintf(stderr, "error: output has %zu values, expected %zu\n", count, want.count);
            return 1;
        }
        double num = 0, den = 0;
        for (size_t k = 0; k < count; k++) {
            double diff = (double)y[k] - (double)want.data[k];
            num += diff * diff;
            den += (double)want.data[k] * want.data[k];
        }
        double rel = sqrt(num / (den > 1e-30 ? den : 1e-30));
        printf("rel L2 vs expected: %.3e\n", rel);
        if (!(rel <= 1e-4)) {
            fprintf(stderr, "error: output differs from the expected one (rel L2 %.3e > 1e-4)\n", rel);
            status = 1;
        }
        free(want.data);
    }
    kiln_context_destroy(ctx);
    kiln_engine_destroy(engine);
    free(y);
    free(x.data);
    return status;
}
