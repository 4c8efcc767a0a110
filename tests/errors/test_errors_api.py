"""Bad calls of the Python API (ArmoRM.from_pretrained, calling the model,
score_sequences): each raises the exception and message the README promises.
"""
from __future__ import annotations

import numpy as np
import pytest

from armorm.model import GatingPatternError
from checkpoints import make_backbone, make_seqcls
from bad_input import MAX_POS, VOCAB, load, ok_seq


# ============================================================================ API errors

def test_token_id_at_vocab_size_names_sequence_and_position(model):
    bad = ok_seq()
    bad[3] = VOCAB
    with pytest.raises(ValueError, match=rf"sequence 1, position 3: token id {VOCAB} is outside the embedding "
                                         rf"\(vocab_size {VOCAB}\)"):
        model([ok_seq(), bad])


def test_negative_token_id(model):
    bad = ok_seq()
    bad[0] = -1
    with pytest.raises(ValueError, match=r"sequence 0, position 0: token id -1 is outside the embedding"):
        model(np.array([bad]))


@pytest.mark.parametrize("big", [2**31, 2**40, 2**63 - 1])
def test_token_id_beyond_int32(model, big):
    with pytest.raises(ValueError, match=rf"input_ids\[0\], position 2: token id {big} is outside the embedding"):
        model([5, 6, big, 7])


def test_token_id_beyond_int64(model):
    with pytest.raises(ValueError, match=rf"input_ids\[0\], position 1: token id {2**70} is outside the embedding"):
        model([5, 2**70, 6, 7])


def test_uint64_token_ids_do_not_wrap(model):
    ids = np.array([5, 6, 7, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(ValueError, match=rf"position 3: token id {2**64 - 1} is outside the embedding"):
        model(ids)


@pytest.mark.parametrize("inp,match", [
    ([], r"input_ids is empty"),
    ([[]], r"sequence 0 is empty"),
    ([ok_seq(), []], r"sequence 1 is empty"),
    (np.zeros((1, 0), dtype=np.int64), r"sequence 0 is empty"),
    (np.zeros((0, 5), dtype=np.int64), r"no sequences to score"),
    (None, r"input_ids is required"),
])
def test_empty_inputs(model, inp, match):
    with pytest.raises(ValueError, match=match):
        model(inp)


def test_score_sequences_empty(model):
    with pytest.raises(ValueError, match=r"no sequences to score"):
        model.score_sequences([])
    with pytest.raises(ValueError, match=r"sequence 0 is empty"):
        model.score_sequences([np.zeros(0, dtype=np.int32)])


def test_sequence_longer_than_max_position_embeddings(model):
    seqs = [ok_seq(MAX_POS), ok_seq(MAX_POS + 1)]
    with pytest.raises(ValueError, match=rf"sequence 1 has {MAX_POS + 1} tokens; the model allows at most "
                                         rf"{MAX_POS} \(max_position_embeddings\)"):
        model(seqs)
    assert model([seqs[0]]).score.shape == (1,)  # exactly max_pos is fine


def test_missing_gating_pattern_names_the_sequence(model):
    with pytest.raises(GatingPatternError, match=r"sequence 2: the gating pattern \[5, 6, 7\] .* was not found"):
        model([ok_seq(), ok_seq(10), [10, 11, 12, 5, 6]])


def test_gating_pattern_error_is_a_valueerror(model):
    with pytest.raises(ValueError, match=r"sequence 0: the gating pattern"):
        model.score_sequences([[10, 11, 12]], fields=["score"])
    # fields that do not need the gating position work without it
    assert model.score_sequences([[10, 11, 12]], fields=["hidden_state"]).hidden_state.shape == (1, 32)


def test_empty_gating_pattern(base):
    with load(base, gating_pattern=[]) as m:
        with pytest.raises(GatingPatternError, match=r"no gating pattern: pass gating_pattern"):
            m([ok_seq()])


@pytest.mark.parametrize("shape", [(1, 2, 8), (2, 1, 1, 8)])
def test_input_ids_3d(model, shape):
    with pytest.raises(ValueError, match=r"input_ids must be 1-D or 2-D, got shape \(" + ", ".join(map(str, shape))):
        model(np.full(shape, 5, dtype=np.int64))


@pytest.mark.parametrize("ids", [
    np.array([10.5, 5, 6, 7]),
    [10.5, 5, 6, 7],
    [[10.5, 5, 6, 7]],
    np.array([np.nan, 5, 6, 7]),
    np.array([np.inf, 5, 6, 7]),
    np.array([True, False, True]),
    np.array([1 + 2j, 5, 6, 7]),
])
def test_non_integer_ids(model, ids):
    with pytest.raises(ValueError, match=r"input_ids\[0\] must hold integer token ids, got dtype"):
        model(ids)


def test_integral_float_ids_are_accepted(model):
    s = ok_seq()
    assert model(np.array(s, dtype=np.float64)).score[0] == model(s).score[0]


@pytest.mark.parametrize("ids,match", [
    ("hello", r"input_ids must be a list, NumPy array or torch tensor, not str"),
    (42, r"input_ids must be a list, NumPy array or torch tensor, not int"),
])
def test_input_ids_wrong_type(model, ids, match):
    with pytest.raises(TypeError, match=match):
        model(ids)


@pytest.mark.parametrize("ids", [["a", "b"], [[5, 6], "x"], [[5, [6]]]])
def test_input_ids_not_token_lists(model, ids):
    with pytest.raises(ValueError, match=r"must be a 1-D sequence of token ids"):
        model(ids)


@pytest.mark.parametrize("mask,match", [
    (np.ones((1, 7)), r"attention_mask must have the shape of input_ids"),
    (np.ones((2, 8)), r"attention_mask must have the shape of input_ids"),
    (np.ones((1, 1, 8)), r"attention_mask must have the shape of input_ids"),
    (np.array([[1, 1, 0, 1, 1, 1, 1, 1]]), r"input_ids\[0\]: attention_mask must be one contiguous run of ones"),
    (np.array([[0, 1, 1, 0, 0, 1, 1, 0]]), r"contiguous run of ones"),
    (np.zeros((1, 8)), r"input_ids\[0\]: attention_mask masks every token"),
])
def test_bad_attention_mask(model, mask, match):
    with pytest.raises(ValueError, match=match):
        model(np.array([ok_seq()]), attention_mask=mask)


def test_attention_mask_with_ragged_rows(model):
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids"):
        model([ok_seq(8), ok_seq(9)], attention_mask=np.ones((2, 8)))


def test_attention_mask_torch_non_contiguous(model):
    torch = pytest.importorskip("torch")
    ids = torch.tensor([ok_seq(), ok_seq()])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 4] = 0
    with pytest.raises(ValueError, match=r"input_ids\[1\]: attention_mask must be one contiguous run"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"input_ids\[1\]: attention_mask must be one contiguous run"):
        model({"input_ids": ids, "attention_mask": mask})


def test_unknown_call_keyword(model):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'labels'"):
        model([ok_seq()], labels=[1])


def test_unknown_from_pretrained_keyword(base):
    with pytest.raises(TypeError, match=r"from_pretrained\(\) got unexpected keyword arguments: bogus, foo"):
        load(base, foo=1, bogus=2)


@pytest.mark.parametrize("dt", ["int8", "float64", "bf32", 3])
def test_bad_torch_dtype(base, dt):
    with pytest.raises(ValueError, match=r"torch_dtype must be float32, bfloat16, float16 or 'auto', got"):
        load(base, torch_dtype=dt)


def test_dtype_and_torch_dtype_disagree(base):
    with pytest.raises(ValueError, match=r"dtype and torch_dtype disagree"):
        load(base, dtype="float32", torch_dtype="bfloat16")


@pytest.mark.parametrize("dm", ["cuda", "cuda:0", {"": "cuda:1"}])
def test_device_map_cuda(base, dm):
    with pytest.raises(RuntimeError, match=r"no CUDA (backend|device)"):
        load(base, device_map=dm)


def test_device_map_unknown(base, model):
    with pytest.raises(ValueError, match=r"device_map must be 'cpu', 'auto' or 'cuda\[:N\]', got 'tpu'"):
        load(base, device_map="tpu")
    with pytest.raises(RuntimeError, match=r"CUDA"):
        model.to("cuda")


@pytest.mark.parametrize("nt", [0, -1, 5000])
def test_bad_num_threads(base, nt):
    with pytest.raises(ValueError, match=rf"num_threads must be in 1\.\.1024, got {nt}"):
        load(base, num_threads=nt)


@pytest.mark.parametrize("env", ["abc", "0", "-3"])
def test_bad_num_threads_env(base, monkeypatch, env):
    monkeypatch.setenv("ARMORM_NUM_THREADS", env)
    with pytest.raises(ValueError, match=rf"ARMORM_NUM_THREADS must be a positive integer, got '{env}'"):
        load(base, num_threads=None)


def test_bad_max_batch_tokens(base):
    with pytest.raises(ValueError, match=r"max_batch_tokens must be positive"):
        load(base, max_batch_tokens=0)


def test_field_the_architecture_lacks(model, tmp_path):
    with pytest.raises(ValueError, match=r"field 'bogus' is not available for LlamaForRewardModelWithGating; "
                                         r"available: rewards, gating_output"):
        model.score_sequences([ok_seq()], fields=["bogus"])
    bb_dir = tmp_path / "bb"
    make_backbone(bb_dir, hidden=32, heads=4, kv_heads=2, inter=48, layers=1, vocab=VOCAB)
    with load(bb_dir) as bb:
        with pytest.raises(ValueError, match=r"field 'rewards' is not available for LlamaModel; "
                                             r"available: hidden_state, prompt_embedding"):
            bb.score_sequences([ok_seq()], fields=["rewards"])
        with pytest.raises(AttributeError, match=r"reward_transform_matrix exists only on ArmoRM checkpoints"):
            bb.reward_transform_matrix
    sc_dir = tmp_path / "sc"
    make_seqcls(sc_dir, hidden=32, heads=4, kv_heads=2, inter=48, layers=1, vocab=VOCAB)
    with load(sc_dir) as sc:
        with pytest.raises(ValueError, match=r"field 'gating_output' is not available for "
                                             r"LlamaForSequenceClassification; available: score, logits"):
            sc.score_sequences([ok_seq()], fields=["gating_output"])


def test_backbone_only_override_has_no_head_fields(base):
    with load(base, architecture="LlamaModel") as m:
        with pytest.raises(ValueError, match=r"field 'score' is not available .*available: hidden_state, "
                                             r"prompt_embedding"):
            m.score_sequences([ok_seq()], fields=["score"])


def test_output_has_no_such_field(model):
    out = model([ok_seq()])
    with pytest.raises(AttributeError, match=r"this output has no field 'loss'; it has rewards"):
        out.loss


def test_reward_pos_wrong_length(model):
    with pytest.raises(ValueError, match=r"reward_pos must have one entry per sequence"):
        model.score_sequences([ok_seq(), ok_seq()], reward_pos=[1])


def test_closed_model(base):
    m = load(base)
    m.close()
    for call in (lambda: m([ok_seq()]), lambda: m.dtype, lambda: m.reward_transform_matrix,
                 lambda: m.score_sequences([ok_seq()], fields=["hidden_state"])):
        with pytest.raises(RuntimeError, match=r"model is closed"):
            call()
    m.close()  # closing twice is fine


def test_closed_by_context_manager(base):
    with load(base) as m:
        m([ok_seq()])
    with pytest.raises(RuntimeError, match=r"closed"):
        m([ok_seq()])
