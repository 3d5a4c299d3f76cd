import json

import torch

from flowflash.models.text import LightEncoder, MiniLMEncoder, WordTokenizer, combine, load_bert


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


def test_minilm_encoder_pads_truncates_and_counts_the_cut(tiny_minilm):
    enc = MiniLMEncoder(tiny_minilm, max_tokens=6)
    h, p, cut = enc.encode(["a red apple", "a red apple on a blue background"])
    assert h.shape == (2, 6, 384) and p.shape == (2, 384) and cut == 1
    assert (h[0, 5:] == 0).all() and (h[0, :5] != 0).any()  # [CLS] a red apple [SEP] + zero padding
    assert torch.allclose(p.norm(dim=-1), torch.ones(2))
    assert enc.encode(["a red apple"])[2] == 0
    # the cut prompt keeps its [SEP] as last token: same as encoding its first 4 words
    short, _, _ = enc.encode(["a red apple on"])
    assert torch.allclose(h[1], short[0], atol=1e-6)


def test_word_tokenizer_and_null_encoders():
    tok = WordTokenizer.build(["Red apple, twemoji style", "dog face"])
    assert tok.encode("red DOG zebra") == [tok.index["red"], tok.index["dog"], 1]
    torch.manual_seed(0)
    light = LightEncoder(len(tok), 384, 8)
    ids, cut = tok.batch(["red apple", "dog face"], 8)
    assert cut == 0 and tok.batch(["red apple dog face twemoji style style style style"], 8)[1] == 1
    mh, mp = torch.randn(2, 5, 384), torch.randn(2, 384)
    on, off = torch.tensor([True, True]), torch.tensor([True, False])
    ctx, pooled = combine(light, ids, mh, mp, on, off)
    assert ctx.shape == (2, 8 + 5, 384) and pooled.shape == (2, 768)
    assert (ctx[1, 8:] == 0).all() and (pooled[1, 384:] == 0).all()  # MiniLM nulled for sample 1 only
    assert torch.equal(ctx[0, 8:], mh[0]) and (ctx[1, :8] != 0).any()
