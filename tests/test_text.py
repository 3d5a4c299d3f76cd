import json

import torch

from flowflash.models.text import LightEncoder, MiniLMEncoder, TextConditioner, WordTokenizer, load_bert


def test_our_bert_matches_transformers(tiny_minilm):
    from transformers import BertConfig, BertModel

    cfg = json.loads((tiny_minilm / "config.json").read_text())
    ref = BertModel(BertConfig(**cfg, hidden_act="gelu"), add_pooling_layer=False).eval()
    ours = load_bert(tiny_minilm)
    missing = ref.load_state_dict({k: v for k, v in __import__("safetensors.torch", fromlist=["x"]).load_file(
        tiny_minilm / "model.safetensors").items()}, strict=False)
    assert not [k for k in missing.missing_keys if "position_ids" not in k]
    ids = torch.tensor([[2, 4, 5, 6, 3, 0, 0]])
    mask = ids != 0
    with torch.no_grad():
        expect = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    got = ours(ids, mask)
    assert torch.allclose(got[mask], expect[mask], atol=1e-4)


def test_minilm_encoder_pads_truncates_and_warns(tiny_minilm):
    enc = MiniLMEncoder(tiny_minilm, max_tokens=6)
    h, p = enc(["a red apple", "a red apple on a blue background"])
    assert h.shape == (2, 6, 384) and p.shape == (2, 384)
    assert (h[0, 5:] == 0).all() and (h[0, :5] != 0).any()  # [CLS] a red apple [SEP] + zero padding
    assert torch.allclose(p.norm(dim=-1), torch.ones(2))
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        enc(["a red apple on a blue background"])
    assert len(w) == 1 and "truncated" in str(w[0].message)


def test_word_tokenizer_and_null_encoders():
    tok = WordTokenizer.build(["Red apple, twemoji style", "dog face"])
    assert tok.encode("red DOG zebra") == [tok.index["red"], tok.index["dog"], 1]
    torch.manual_seed(0)
    cond = TextConditioner(tok, LightEncoder(len(tok), 384, 8), None, minilm_max_tokens=5)
    ids = cond.light_ids(["red apple", "dog face"])
    mh, mp = torch.randn(2, 5, 384), torch.randn(2, 384)
    on, off = torch.tensor([True, True]), torch.tensor([True, False])
    ctx, pooled = cond.combine(ids, mh, mp, on, off)
    assert ctx.shape == (2, 8 + 5, 384) and pooled.shape == (2, 768)
    assert (ctx[1, 8:] == 0).all() and (pooled[1, 384:] == 0).all()  # MiniLM nulled for sample 1 only
    assert torch.equal(ctx[0, 8:], mh[0]) and (ctx[1, :8] != 0).any()
