"""The report: self-contained HTML (table, inline PNGs, nothing fetched), markdown, per-layer grid."""

import base64
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from secateurs.errors import SecateursError
from secateurs.eval.report import (
    describe,
    layer_grid,
    load_results,
    render_html,
    variant_table,
    write_report,
)

TASK_ROWS = [
    {"model": "m", "variant": v, "engine": "secateurs", "task": t, "acc": a, "acc_norm": None, "stderr": 0.01,
     "n": 100, "subset": 100}
    for v, accs in (("dense", (0.5, 0.7)), ("sparsegpt-50", (0.45, 0.66)), ("wanda-50", (0.4, 0.6)))
    for t, a in zip(("piqa", "boolq"), accs)
] + [{"model": "m", "variant": "dense", "engine": "lm-eval", "task": "piqa", "acc": 0.99, "acc_norm": None,
      "stderr": 0.01, "n": 100, "subset": 100}]
QUALITY_ROWS = [
    {"row": "dense", "engine": "secateurs", "method": "dense", "sparsity": 0.0, "pattern": "unstructured", "bits": None,
     "group_size": None, "ppl": 35.0},
    {"row": "sparsegpt-50", "engine": "secateurs", "method": "sparsegpt", "sparsity": 0.5, "pattern": "unstructured",
     "bits": None, "group_size": None, "ppl": 51.0},
    {"row": "wanda-50", "engine": "secateurs", "method": "wanda", "sparsity": 0.5, "pattern": "unstructured",
     "bits": None, "group_size": None, "ppl": 64.0},
    {"row": "wanda-50", "engine": "llmcompressor", "method": "wanda", "sparsity": 0.5, "pattern": "unstructured",
     "bits": None, "group_size": None, "ppl": 99.0},
]
DECODE = {"rows": [{"model": "m", "engine": "secateurs", "variant": "dense", "threads": 2, "decode_tok_s": 40.0,
                    "weight_mb": 500.0},
                   {"model": "m", "engine": "secateurs", "variant": "sparsegpt-50", "threads": 2, "decode_tok_s": 60.0,
                    "weight_mb": 300.0}]}
LAYERS = {"recipe": {}, "layers": [
    {"name": f"model.layers.{b}.{t}", "loss": None if (b, t) == (1, "mlp.down_proj") else (b + 1) * (i + 1) * 0.5}
    for b in range(3) for i, t in enumerate(("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"))]}


@pytest.fixture()
def files(tmp_path):
    paths = {}
    for name, data in (("tasks.json", TASK_ROWS), ("quality.json", QUALITY_ROWS), ("decode.json", DECODE),
                       ("compression.json", LAYERS)):
        paths[name] = tmp_path / "run" / name if name == "compression.json" else tmp_path / name
        paths[name].parent.mkdir(exist_ok=True)
        paths[name].write_text(json.dumps(data))
    return paths


class Page(HTMLParser):
    """The table rows (cell texts) and the img attributes of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.table, self._row, self._cell = [], [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.table.append(self._row)

    @property
    def header(self):
        return self.table[0]

    @property
    def rows(self):
        return self.table[1:]


def test_html_is_self_contained_with_table_and_images(files, tmp_path):
    output = write_report(list(files.values()), tmp_path / "report.html")
    text = output.read_text()
    for forbidden in ("http://", "https://", "<script", "<link", "url("):
        assert forbidden not in text
    page = Page()
    page.feed(text)
    assert page.header[:7] == ["variant", "method", "sparsity", "pattern", "bits", "size MB", "ppl"]
    assert "piqa" in page.header and "boolq" in page.header
    by_variant = {row[0]: dict(zip(page.header, row)) for row in page.rows}
    assert set(by_variant) == {"dense", "sparsegpt-50", "wanda-50"}
    assert by_variant["dense"]["piqa"] == "50.0"  # ours, not the lm-eval row
    assert by_variant["wanda-50"]["ppl"] == "64.0"  # ours, not the reference's
    assert by_variant["sparsegpt-50"]["mean acc"] == "55.5 (2)"
    assert by_variant["sparsegpt-50"]["decode tok/s"] == "60.0"
    assert len(page.images) == 4  # ppl and tasks vs sparsity, speed vs size, one heatmap
    for image in page.images:
        assert image["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(image["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        assert image["alt"]


def test_markdown_writes_table_and_pngs(files, tmp_path):
    (tmp_path / "out").mkdir()
    output = write_report(list(files.values()), tmp_path / "out" / "report.md")
    text = output.read_text()
    assert "| variant | method |" in text and "| sparsegpt-50 | sparsegpt | 50.0 |" in text
    images = sorted(p.name for p in output.parent.glob("report-*.png"))
    assert images == ["report-layers-run.png", "report-ppl-vs-sparsity.png", "report-speed-vs-size.png",
                      "report-tasks-vs-sparsity.png"]
    for name in images:
        assert f"]({name})" in text


def test_layer_grid_blocks_by_type():
    blocks, types, grid = layer_grid(LAYERS["layers"])
    assert blocks == [0, 1, 2] and types == ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"]
    assert grid[2][1] == pytest.approx(3 * 2 * 0.5) and math.isnan(grid[1][2])


def test_describe_from_names():
    assert describe("sparsegpt-50") == {"method": "sparsegpt", "sparsity": 0.5, "pattern": "unstructured",
                                             "bits": None, "group_size": None}
    assert describe("wanda-2of4")["pattern"] == "2:4" and describe("wanda-2of4")["sparsity"] == 0.5
    assert describe("gptq-w4g64")["bits"] == 4 and describe("gptq-w4g64")["sparsity"] is None
    assert describe("sparsegpt-50-w4g64")["sparsity"] == 0.5 and describe("sparsegpt-50-w4g64")["bits"] == 4


def test_tasks_only_report_renders(files):
    html = render_html(load_results([files["tasks.json"]]))
    assert "<table id=\"variants\">" in html
    columns, table = variant_table(load_results([files["tasks.json"]]))
    assert columns == ["piqa", "boolq"] and [e["variant"] for e in table] == ["dense", "sparsegpt-50", "wanda-50"]


def test_a_second_models_rows_stay_out_of_the_first_models_table(tmp_path):
    other = [row | {"model": "other", "acc": 0.0} for row in TASK_ROWS] + [
        {**TASK_ROWS[0], "model": "other", "variant": "only-other"}]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(TASK_ROWS + other))
    _, table = variant_table(load_results([path]))
    assert [e["variant"] for e in table] == ["dense", "sparsegpt-50", "wanda-50"]
    assert table[0]["accs"] == {"piqa": 0.5, "boolq": 0.7}


def test_bad_inputs_are_one_error(files, tmp_path):
    with pytest.raises(SecateursError, match="no such file"):
        load_results([tmp_path / "missing.json"])
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(SecateursError, match="not a results file"):
        load_results([tmp_path / "other.json"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SecateursError, match="not readable JSON"):
        load_results([tmp_path / "broken.json"])
    with pytest.raises(SecateursError, match=".html or .md"):
        write_report([files["tasks.json"]], tmp_path / "report.pdf")
    with pytest.raises(SecateursError, match="at least one"):
        load_results([])


FINETUNE_ROWS = [
    {"variant": v, "loss": loss, "qat": False, "budget": {"tokens": 1000}, "tokens": tokens, "ppl": ppl,
     "ppl_oneshot": oneshot, "ppl_dense_ft": 26.0, "recovery": r, "sparsity": sp, "task_mean": 0.3, "tokens_per_s": 80.0}
    for v, loss, tokens, ppl, oneshot, r, sp in (("dense", "ce", 1000, 26.0, 35.0, None, 0.0),
                                                 ("sparsegpt-70", "none", 0, 150.0, 150.0, None, 0.7),
                                                 ("sparsegpt-70", "squarehead", 1000, 59.0, 150.0, 0.736, 0.7))]
ENCODER_ROWS = [
    {"kind": "accuracy", "method": m, "sparsity": sp, "structure": "unstructured", "quant": None, "kd": kd,
     "accuracy": acc, "accuracy_std": 0.01 if sp else None, "f1": acc - 0.02, "seeds": 3, "epochs": 2}
    for m, sp, kd, acc in (("dense", 0.0, False, 0.84), ("gradual-obert", 0.9, True, 0.83), ("gradual-gmp", 0.9, True, 0.8))
] + [{"kind": "speed", "method": m, "sparsity": sp, "quant": q, "engine": e, "dtype": "fp32", "batch": 8, "seqlen": 128,
      "threads": 2, "seq_per_s": v, "accuracy": 0.84, "cpu": "AMD EPYC", "isa": isa}
     for m, sp, q, e, v, isa in (("dense", 0.0, None, "torch", 34.0, "torch"), ("sparse", 0.9, "int8", "secateurs", 68.0, "avx2"))
] + [{"kind": "speed", "method": "dense", "sparsity": 0.0, "quant": None, "engine": "torch", "dtype": "fp32", "batch": 8,
      "seqlen": 128, "threads": 2, "seq_per_s": 50.0, "accuracy": 0.84, "cpu": "AMD EPYC 9R45", "isa": "torch"}]
VQ_ROWS = [
    {"model": "m", "engine": "secateurs", "method": "vq", "config": "2x8g8", "bits_per_weight": 2.15, "ppl": 73.7,
     "decode_tok_s": None},
    {"model": "m", "engine": "secateurs", "method": "gptq", "config": "w4g64", "bits_per_weight": 4.5, "ppl": 39.0,
     "decode_tok_s": None},
    {"model": "m", "engine": "secateurs", "method": "vq", "config": "2x8g8", "kind": "decode", "decode_tok_s": 37.3,
     "threads": 1, "kernel_path": "avx2"},
]
DIFFUSION_ROWS = [
    {"model": "ddpm", "method": m, "config": c, "bits_per_weight": b, "psnr": p, "rel_l2": None, "fid": None,
     "class_acc": None} for m, c, b, p in (("dense", "dense", 32.0, None), ("gptq", "gptq-w4", 4.13, 34.9),
                                           ("vq", "vq-2x6g4", 3.62, 31.9))]


def test_sections_of_finetune_encoder_vq_and_diffusion_results(tmp_path):
    paths = []
    for name, rows in (("finetune", FINETUNE_ROWS), ("obert", ENCODER_ROWS), ("vq", VQ_ROWS), ("diffusion", DIFFUSION_ROWS)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(rows))
    text = write_report(paths, tmp_path / "report.html").read_text()
    for title in ("Sparse fine-tuning, 1,000 tokens", "Encoder pruning: accuracy", "Encoder speed (AMD EPYC)",
                  "Encoder speed (AMD EPYC 9R45)",
                  "Quantization: bits against perplexity", "Quantization: decode speed", "Diffusion: ddpm"):
        assert f"<h2>{title}</h2>" in text
    assert "<table id=\"variants\">" not in text  # no task or quality rows: no variants table
    page = Page()
    page.feed(text)
    cells = [row for row in page.table]
    assert ["sparsegpt-70", "squarehead", "no", "70.0", "1,000", "150.0", "59.0", "26.0", "0.74", "30.0", "80.0"] in cells
    assert ["gradual-obert", "unstructured", "90.0", "—", "yes", "83.0 ± 1.0", "81.0", "3", "2"] in cells
    assert ["2", "8", "secateurs", "sparse 90% int8", "68.0", "2.00", "84.0", "avx2"] in cells  # 2x torch fp32
    assert ["m", "secateurs", "vq", "2x8g8", "1", "avx2", "37.3"] in cells
    assert ["vq", "vq-2x6g4", "3.62", "31.90", "—", "—", "—"] in cells
    assert len(page.images) == 4  # fine-tuning bars, encoder accuracy, VQ bits, diffusion PSNR


def test_report_replaces_its_own_output_but_not_a_directory(files, tmp_path):
    output = tmp_path / "report.html"
    write_report([files["tasks.json"]], output)
    write_report([files["tasks.json"], files["quality.json"]], output)  # a second run replaces the page
    assert "64.0" in output.read_text()
    (tmp_path / "folder.html").mkdir()
    with pytest.raises(SecateursError, match="is a directory"):
        write_report([files["tasks.json"]], tmp_path / "folder.html")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_renders_in_headless_chromium(files, tmp_path):
    output = write_report(list(files.values()), tmp_path / "report.html")
    result = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                             "--v=0", "--dump-dom", output.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0
    assert "<table id=\"variants\">" in result.stdout and result.stdout.count("<img") == 4
    assert "Uncaught" not in result.stderr and "CONSOLE" not in result.stderr
