"""fusedemb.data: sliding-window next-token pairs and the gpt2 dataloader."""

from __future__ import annotations

import pytest
import torch
from shared_data import use_shared_tiktoken_cache, verdict_text

import fusedemb.data
from fusedemb.data import END_OF_TEXT, GPTDataset, create_dataloader, load_gpt2_tokenizer, split_text, tile_to_batch


class CharTokenizer:
    """One id per character (its code point), with tiktoken's encode signature: windows are easy to read."""

    def encode(self, text: str, allowed_special=frozenset()) -> list[int]:
        assert END_OF_TEXT in allowed_special, "GPTDataset must let <|endoftext|> through as a token"
        return [ord(character) for character in text]


def ids_of(text: str) -> list[int]:
    return [ord(character) for character in text]


def test_windows_are_next_token_pairs_with_the_given_stride():
    dataset = GPTDataset("abcdefghij", CharTokenizer(), max_length=4, stride=3)
    # 10 tokens: a window and its target need 5, starts at 0, 3 (6 + 5 > 10 stops there).
    assert len(dataset) == 2
    inputs, targets = zip(*(dataset[k] for k in range(len(dataset))))
    assert [x.tolist() for x in inputs] == [ids_of("abcd"), ids_of("defg")]
    assert [y.tolist() for y in targets] == [ids_of("bcde"), ids_of("efgh")]
    assert all(x.dtype == torch.long and x.shape == (4,) for x in inputs + targets)


@pytest.mark.parametrize("num_tokens, max_length, stride", [(5, 4, 1), (9, 4, 4), (10, 4, 4), (100, 7, 3), (30, 2, 9)])
def test_window_count_covers_every_start_with_a_full_target(num_tokens, max_length, stride):
    dataset = GPTDataset("x" * num_tokens, CharTokenizer(), max_length, stride)
    starts = range(0, num_tokens - max_length, stride)  # start s is usable iff s + max_length < num_tokens
    assert len(dataset) == len(starts)


@pytest.mark.parametrize("max_length, stride, message", [(0, 1, "max_length"), (-2, 1, "max_length"), (4, 0, "stride")])
def test_nonpositive_sizes_are_rejected(max_length, stride, message):
    with pytest.raises(ValueError, match=message):
        GPTDataset("abcdefghij", CharTokenizer(), max_length, stride)


@pytest.mark.parametrize("length", [1, 7, 12, 30])
def test_tile_to_batch_repeats_the_stream_end_to_end(length):
    stream = torch.randint(0, 50257, (length,))
    batch = tile_to_batch(stream, 3, 4)
    assert batch.shape == (3, 4)
    assert batch.flatten().tolist() == [stream[n % length].item() for n in range(12)]
    with pytest.raises(ValueError, match="no tokens"):
        tile_to_batch(stream[:0], 3, 4)


def test_split_text_holds_out_the_end():
    text = "abcdefghij" * 10
    train, validation = split_text(text, 0.9)
    assert (train, validation) == (text[:90], text[90:])
    for ratio in (0, 1, 1.5):
        with pytest.raises(ValueError, match="train_ratio must be in"):
            split_text(text, ratio)


def test_text_shorter_than_one_window_is_rejected():
    with pytest.raises(ValueError, match="too short"):
        GPTDataset("abcd", CharTokenizer(), max_length=4, stride=1)  # needs 5 tokens


def test_missing_encoding_raises_an_error_naming_tiktoken_cache_dir(monkeypatch, tmp_path):
    import tiktoken

    def offline_get_encoding(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline_get_encoding)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent/tiktoken-cache")
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR") as caught:
        load_gpt2_tokenizer()
    assert "/nonexistent/tiktoken-cache" in str(caught.value)
    assert isinstance(caught.value.__cause__, ConnectionError)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")  # unset: the checkout's cache is named, where it has one
    monkeypatch.setattr(fusedemb.data, "CHECKOUT_TIKTOKEN_CACHE", tmp_path)
    with pytest.raises(RuntimeError, match=f"is not set.*this checkout has them in {tmp_path}"):
        load_gpt2_tokenizer()


def test_dataloader_on_the_verdict_gives_the_classic_first_batch():
    text = verdict_text()
    use_shared_tiktoken_cache()
    loader = create_dataloader(text, batch_size=8, max_length=4, stride=4, shuffle=False)
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (8, 4)
    # "I HAD always thought Jack Gisburn ..." in the gpt2 encoding.
    assert inputs[0].tolist() == [40, 367, 2885, 1464]
    assert inputs[1].tolist() == [1807, 3619, 402, 271]
    # With stride == max_length the windows tile the text: each target ends where the next input starts.
    torch.testing.assert_close(targets[:, :-1], inputs[:, 1:])
    torch.testing.assert_close(targets[:-1, -1], inputs[1:, 0])
    num_tokens = len(load_gpt2_tokenizer().encode(text))
    assert len(loader.dataset) == (num_tokens - 1 - 4) // 4 + 1
    assert len(loader) == len(loader.dataset) // 8  # drop_last drops the incomplete final batch


def test_dataloader_shuffle_is_reproducible_with_a_seeded_generator():
    text = verdict_text()
    use_shared_tiktoken_cache()

    def first_batch(seed):
        loader = create_dataloader(text, batch_size=2, max_length=8, stride=8, generator=torch.Generator().manual_seed(seed))
        return next(iter(loader))[0]

    torch.testing.assert_close(first_batch(7), first_batch(7))
    assert not torch.equal(first_batch(7), first_batch(8))


def test_dataloader_refuses_a_text_with_fewer_windows_than_one_batch():
    use_shared_tiktoken_cache()
    with pytest.raises(ValueError, match="fewer than batch_size"):
        create_dataloader("Hello, world. This is a short text.", batch_size=4, max_length=4, stride=4)


def test_dataloader_warns_when_given_a_file_name_instead_of_a_text(tmp_path, recwarn):
    use_shared_tiktoken_cache()
    path = tmp_path / "story.txt"
    path.write_text("Not read: the loader takes texts.")
    with pytest.warns(UserWarning, match=r"the name of a file: .*\(Path\(name\)\.read_text\(\)\)"):
        create_dataloader(str(path), batch_size=1, max_length=4, stride=4)
    create_dataloader(f"The story is in {path}.", batch_size=1, max_length=4, stride=4)  # a text naming a file
    assert not recwarn.list


def test_dataloader_refuses_a_path_or_bytes_with_a_message_that_says_what_to_pass(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Not read: the loader takes texts.")
    remedy = r"pass the file's contents \(Path\(name\)\.read_text\(\)\)"
    with pytest.raises(TypeError, match=f"a str, got {type(path).__name__}: {remedy}"):
        create_dataloader(path, batch_size=1, max_length=4, stride=4)  # was: object of type 'PosixPath' has no len()
    with pytest.raises(TypeError, match=r"a str, got bytes$"):
        create_dataloader(b"Some bytes, not a text.", batch_size=1, max_length=4, stride=4)


def test_dataloader_leaves_batch_size_none_to_the_dataloader():
    """batch_size=None turns the DataLoader's batching off: one (input, target) window per item.
    It failed on the drop_last check ('<' not supported between int and NoneType)."""
    use_shared_tiktoken_cache()
    text = verdict_text()
    inputs, targets = next(iter(create_dataloader(text, batch_size=None, max_length=4, stride=4, shuffle=False, drop_last=False)))
    assert inputs.shape == targets.shape == (4,)
    with pytest.raises(ValueError, match="mutually exclusive with drop_last"):  # the DataLoader's own words
        create_dataloader(text, batch_size=None, max_length=4, stride=4)


def test_dataloader_passes_other_options_to_the_dataloader():
    use_shared_tiktoken_cache()
    loader = create_dataloader(verdict_text(), batch_size=2, max_length=8, stride=8, num_workers=1, persistent_workers=True, prefetch_factor=3)
    assert loader.persistent_workers and loader.prefetch_factor == 3
    first = next(iter(loader))
    assert first[0].shape == (2, 8)
