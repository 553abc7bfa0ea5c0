"""Shared by every test directory."""

import pytest
import torch

# Their problems are tiny, so thread start-up costs more than it saves on a shared 2-core machine,
# and bit-identical comparisons (resume, subprocesses) want one intra-op thread.
SINGLE_THREADED = {"algorithms", "diffusion", "pipeline", "training"}


@pytest.fixture(autouse=True)
def single_thread(request):
    if request.path.parent.name not in SINGLE_THREADED:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bert_word_tokenizer():
    """A BERT-style word-level tokenizer for tiny encoders: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, words
    "w4" .. "w39" (vocabulary 40)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i for i in range(4, 40)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                      cls_token="[CLS]", sep_token="[SEP]")
