// host_test.cu: runs the CUDA backend's host-side code without a GPU, for
// tests/test_cuda_build.py. Each subcommand prints key=value lines that the
// Python test checks against its own arithmetic.
//
//   host_test plan H I L NH NKV HD V ARCH K D NHID NL ATTB MLPB MAXTOK [QKVB QKNORM POSTNORMS]
//                                         (the last three: family switches, default 0)
//   host_test tiles BLOCK LEN...          attention tiles for sequences of these lengths
//   host_test pack LEN[/PARENT]...        batch upload layout + contents (reward = last, gating = half the
//                                         full length); LEN/P: a sequence continuing sequence P (shared prefix)
//   host_test launch                      launch shapes for a few sizes
//   host_test fits NEED FREE              the out-of-memory message
//   host_test devcount                    cuda_device_count()
//   host_test create H L                  cuda_model_create on a weightless model of this size:
//                                         fails before touching weights (no GPU / not enough memory)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../backend_cuda.h"

static Config parse_config(char **a) {
    Config c;
    memset(&c, 0, sizeof c);
    c.hidden_size = atoi(a[0]);
    c.intermediate_size = atoi(a[1]);
    c.num_layers = atoi(a[2]);
    c.num_heads = atoi(a[3]);
    c.num_kv_heads = atoi(a[4]);
    c.head_dim = atoi(a[5]);
    c.vocab_size = atoi(a[6]);
    c.arch = (Arch)atoi(a[7]);
    c.num_objectives = atoi(a[8]);
    c.gating_hidden_dim = atoi(a[9]);
    c.gating_n_hidden = atoi(a[10]);
    c.num_labels = atoi(a[11]);
    c.attention_bias = atoi(a[12]);
    c.mlp_bias = atoi(a[13]);
    c.compute_head = 1;
    c.max_position_embeddings = 8192;
    c.rms_norm_eps = 1e-5f;
    c.rope_theta = 500000.0;
    c.gating_temperature = 10.0f;
    return c;
}

static int cmd_plan(int argc, char **argv) {
    if (argc < 15) return 2;
    Config c = parse_config(argv);
    const long long maxtok = atoll(argv[14]);
    if (argc >= 18) {
        c.qkv_bias = atoi(argv[15]);
        c.qk_norm = atoi(argv[16]);
        c.post_norms = atoi(argv[17]);
    }
    CudaWeightLayout w;
    CudaActLayout a;
    CudaMemPlan p;
    if (cuda_weight_layout(&c, &w) || cuda_act_layout(&c, maxtok, &a) || cuda_plan_memory(&c, maxtok, &p)) {
        printf("error=1\n");
        return 0;
    }
    printf("final_norm=%lld\ninv_freq=%lld\n", (long long)w.final_norm, (long long)w.inv_freq);
    printf("weights=%lld\nembed=%lld\nlayers=%lld\nlayer_stride=%lld\n", (long long)w.total, (long long)w.embed,
           (long long)w.layers, (long long)w.layer_stride);
    printf("wqkv=%lld\nwo=%lld\nwgu=%lld\nwdown=%lld\nattn_norm=%lld\nmlp_norm=%lld\n", (long long)w.wqkv,
           (long long)w.wo, (long long)w.wgu, (long long)w.wdown, (long long)w.attn_norm, (long long)w.mlp_norm);
    printf("bqkv=%lld\nbo=%lld\nbgu=%lld\nbdown=%lld\n", (long long)w.bqkv, (long long)w.bo, (long long)w.bgu,
           (long long)w.bdown);
    printf("q_norm=%lld\nk_norm=%lld\nattn_post_norm=%lld\nmlp_post_norm=%lld\nact_y=%lld\n", (long long)w.q_norm,
           (long long)w.k_norm, (long long)w.attn_post_norm, (long long)w.mlp_post_norm, (long long)a.y);
    printf("regression=%lld\ntransform=%lld\nscore=%lld\n", (long long)w.regression, (long long)w.transform,
           (long long)w.score);
    for (int j = 0; j <= c.gating_n_hidden && c.arch == ARCH_ARMORM; j++)
        printf("gate_w%d=%lld\ngate_b%d=%lld\n", j, (long long)w.gate_w[j], j, (long long)w.gate_b[j]);
    printf("act_total=%lld\nact_x=%lld\nact_xn=%lld\nact_qkv=%lld\nact_att=%lld\nact_gu=%lld\nact_h=%lld\nmlp_chunk=%lld\n",
           (long long)a.total, (long long)a.x, (long long)a.xn, (long long)a.qkv, (long long)a.att, (long long)a.gu,
           (long long)a.h, (long long)a.mlp_chunk);
    printf("plan_weights=%lld\nplan_act=%lld\nplan_batch=%lld\nplan_ws=%lld\nplan_reserve=%lld\nplan_total=%lld\n",
           (long long)p.weight_bytes, (long long)p.activation_bytes, (long long)p.batch_bytes,
           (long long)p.workspace_bytes, (long long)p.reserve_bytes, (long long)p.total_bytes);
    return 0;
}

static int64_t *parse_cu(int n, char **lens) {
    int64_t *cu = (int64_t *)calloc((size_t)n + 1, sizeof *cu);
    for (int i = 0; i < n; i++) cu[i + 1] = cu[i] + atoll(lens[i]);
    return cu;
}

static int cmd_tiles(int argc, char **argv) {
    if (argc < 2) return 2;
    const int block = atoi(argv[0]), B = argc - 1;
    int64_t *cu = parse_cu(B, argv + 1);
    const int64_t n = cuda_attn_tile_count(cu, B, block);
    CudaAttnTile *t = (CudaAttnTile *)calloc((size_t)(n > 0 ? n : 1), sizeof *t);
    const int64_t got = cuda_attn_plan(cu, B, block, t, n);
    printf("count=%lld\nplanned=%lld\ntiles=", (long long)n, (long long)got);
    for (int64_t i = 0; i < got; i++) printf("%s%d:%d", i ? "," : "", t[i].seq, t[i].q0);
    printf("\n");
    // a too-small capacity must be refused, not overrun
    printf("short_cap=%lld\n", (long long)(n > 1 ? cuda_attn_plan(cu, B, block, t, n - 1) : -1));
    free(t);
    free(cu);
    return 0;
}

static int cmd_pack(int argc, char **argv) {
    if (argc < 1) return 2;
    const int B = argc;
    int64_t *cu = parse_cu(B, argv), *full = (int64_t *)calloc((size_t)B, sizeof *full);
    int32_t *parent = (int32_t *)calloc((size_t)B, sizeof *parent);
    int any_parent = 0;
    for (int b = 0; b < B; b++) {
        const char *slash = strchr(argv[b], '/');
        parent[b] = slash ? atoi(slash + 1) : -1;
        any_parent |= parent[b] >= 0;
        full[b] = (parent[b] >= 0 ? full[parent[b]] : 0) + cu[b + 1] - cu[b];
    }
    const int64_t T = cu[B];
    int32_t *tok = (int32_t *)calloc((size_t)T, sizeof *tok);
    int64_t *gp = (int64_t *)calloc((size_t)B, sizeof *gp);
    for (int64_t t = 0; t < T; t++) tok[t] = (int32_t)(1000 + t);
    for (int b = 0; b < B; b++) gp[b] = full[b] / 2;
    Batch bt = {tok, cu, B, NULL, gp, 0, any_parent ? parent : NULL};
    Config c;
    memset(&c, 0, sizeof c);
    c.arch = ARCH_ARMORM;
    c.hidden_size = 8;
    c.num_objectives = 3;
    c.gating_hidden_dim = 5;
    const int64_t nt = cuda_attn_tile_count(cu, B, CUDA_ATTN_BLOCK_Q);
    CudaBatchLayout l;
    if (cuda_batch_layout(&c, T, B, nt, 1, &l)) {
        printf("error=1\n");
        return 0;
    }
    int32_t *buf = (int32_t *)calloc((size_t)l.n_ints, sizeof *buf);
    const int rc = cuda_batch_pack(&bt, &l, CUDA_ATTN_BLOCK_Q, buf);
    printf("rc=%d\nn_ints=%lld\nntiles=%lld\n", rc, (long long)l.n_ints, (long long)l.ntiles);
    printf("off_tokens=%lld\noff_pos=%lld\noff_cu=%lld\noff_rows=%lld\noff_tiles=%lld\noff_seg=%lld\n",
           (long long)l.tokens, (long long)l.pos, (long long)l.cu, (long long)l.rows, (long long)l.tiles,
           (long long)l.seg);
    printf("hidden=%lld\nprompt=%lld\nrewards=%lld\ngating=%lld\nscore=%lld\nlogits=%lld\nall_hidden=%lld\nn_floats=%lld\n"
           "scratch_floats=%lld\ndevice_bytes=%lld\nhost_bytes=%lld\n",
           (long long)l.hidden, (long long)l.prompt, (long long)l.rewards, (long long)l.gating, (long long)l.score,
           (long long)l.logits, (long long)l.all_hidden, (long long)l.n_floats, (long long)l.scratch_floats,
           (long long)l.device_bytes, (long long)l.host_bytes);
    printf("buf=");
    for (int64_t i = 0; i < l.n_ints; i++) printf("%s%d", i ? "," : "", buf[i]);
    printf("\n");
    free(buf);
    free(gp);
    free(tok);
    free(parent);
    free(full);
    free(cu);
    return 0;
}

static void print_launch(const char *name, CudaLaunch l) {
    printf("%s=%u,%u,%u,%u,%zu\n", name, l.grid_x, l.grid_y, l.grid_z, l.block, l.smem);
}

static int cmd_launch(void) {
    print_launch("rows_4096x4096", cuda_launch_rows(4096, 4096));
    print_launch("rows_10x48", cuda_launch_rows(10, 48));
    print_launch("rows_3x100000", cuda_launch_rows(3, 100000));
    print_launch("elem_1000_1", cuda_launch_elementwise(1000, 1));
    print_launch("elem_big_8", cuda_launch_elementwise(16384LL * 14336, 8));
    print_launch("attn_tc", cuda_launch_attention(300, 16000, 32, 128));
    print_launch("attn_fallback", cuda_launch_attention(3, 100, 4, 24));
    print_launch("head_7x19", cuda_launch_head_linear(7, 19));
    printf("tc16=%d\ntc24=%d\ntc128=%d\ntc256=%d\n", cuda_attn_tc_supported(16), cuda_attn_tc_supported(24),
           cuda_attn_tc_supported(128), cuda_attn_tc_supported(256));
    return 0;
}

static int cmd_fits(int argc, char **argv) {
    if (argc < 2) return 2;
    CudaMemPlan p;
    memset(&p, 0, sizeof p);
    p.total_bytes = atoll(argv[0]);
    p.weight_bytes = p.total_bytes / 2;
    p.max_tokens = CUDA_DEFAULT_MAX_TOKENS;
    char msg[1024] = "";
    const int rc = cuda_plan_check_fits(&p, atoll(argv[1]), 85899345920LL, 0, msg, sizeof msg);
    printf("rc=%d\nmsg=%s\n", rc, msg);
    return 0;
}

static int cmd_create(int argc, char **argv) {
    if (argc < 2) return 2;
    Model m;
    memset(&m, 0, sizeof m);
    Config *c = &m.cfg;
    c->arch = ARCH_BACKBONE;
    c->hidden_size = atoi(argv[0]);
    c->intermediate_size = 4 * c->hidden_size;
    c->num_layers = atoi(argv[1]);
    c->num_heads = c->hidden_size / 128;
    c->num_kv_heads = c->num_heads;
    c->head_dim = 128;
    c->vocab_size = 1000;
    c->max_position_embeddings = 8192;
    CudaModel *cm = NULL;
    ArmError e;
    memset(&e, 0, sizeof e);
    const int rc = cuda_model_create(&cm, &m, 0, &e);
    printf("rc=%d\nmsg=%s\n", rc, e.msg);
    cuda_model_free(cm);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: host_test plan|tiles|pack|launch|fits|devcount|create ...\n");
        return 2;
    }
    const char *cmd = argv[1];
    int rc = 2;
    if (!strcmp(cmd, "plan")) rc = cmd_plan(argc - 2, argv + 2);
    else if (!strcmp(cmd, "tiles")) rc = cmd_tiles(argc - 2, argv + 2);
    else if (!strcmp(cmd, "pack")) rc = cmd_pack(argc - 2, argv + 2);
    else if (!strcmp(cmd, "launch")) rc = cmd_launch();
    else if (!strcmp(cmd, "fits")) rc = cmd_fits(argc - 2, argv + 2);
    else if (!strcmp(cmd, "devcount")) {
        printf("count=%d\n", cuda_device_count());
        char d[512];
        const int ok = cuda_device_describe(0, d, sizeof d);
        printf("describe_rc=%d\ndescribe=%s\n", ok, d);
        rc = 0;
    } else if (!strcmp(cmd, "create")) rc = cmd_create(argc - 2, argv + 2);
    if (rc == 2) fprintf(stderr, "host_test: bad arguments for %s\n", cmd);
    return rc;
}
