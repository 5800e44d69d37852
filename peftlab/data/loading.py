"""Data loaders that make a killed run resume exactly where it stopped.

Lightning saves and restores the state of a training DataLoader that has ``state_dict``/``load_state_dict``
(its "stateful loader" protocol) but ships no such loader; torchdata's ``StatefulDataLoader`` would add a
dependency and still leave the global RNG (dropout) to the user. :class:`ResumableLoader` is the small piece
that closes the gap. Its state is

* ``position``: batches of the current epoch already handed to the training loop (Lightning does not
  prefetch from a loader with a length, so at checkpoint time this is exactly the batches trained on);
* ``epoch_seed``: the seed this epoch's shuffle was drawn with;
* ``rng``: the torch / numpy / python RNG states when the checkpoint was written.

On resume the loader replays the same shuffle, skips the consumed batches by index (no data is read for
them) and restores the RNG right where the uninterrupted run would continue: before the first remaining
batch mid-epoch, before the next epoch's shuffle at an epoch boundary. Evaluation loaders get their own
generator so that validation never draws from the global RNG, which would make the training stream depend
on whether validation ran before or after a checkpoint.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from peftlab.errors import PeftLabError


class EpochShuffleSampler(Sampler[int]):
    """``RandomSampler`` (same draws, same order) that remembers its epoch's seed and can replay it.

    With ``lengths``, the shuffled order is cut into groups of ``group_batches`` batches and each group is
    sorted by length (longest first), so a batch holds examples of similar length and little padding, while
    the data order stays random at the scale of groups (transformers' ``LengthGroupedSampler`` idea)."""

    def __init__(self, data_source, lengths: list[int] | None = None, batch_size: int = 1,
                 group_batches: int = 50) -> None:
        self.data_source = data_source
        self.lengths, self.group = lengths, batch_size * group_batches
        self.epoch_seed: int | None = None
        self._replay_seed: int | None = None

    def __len__(self) -> int:
        return len(self.data_source)

    def replay(self, seed: int) -> None:
        """Use ``seed`` for the next epoch's shuffle instead of drawing one."""
        self._replay_seed = seed

    def __iter__(self):
        if self._replay_seed is not None:
            seed, self._replay_seed = self._replay_seed, None
        else:  # exactly RandomSampler's draw, so runs keep the order they had before resuming existed
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.epoch_seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        if self.lengths is not None:
            lengths = self.lengths
            order = [i for start in range(0, len(order), self.group)
                     for i in sorted(order[start:start + self.group], key=lambda i: -lengths[i])]
        yield from order


class _SkipBatches:
    """A batch sampler that leaves out its first ``skip`` batches (indices only: no data is read)."""

    def __init__(self, batches, skip: int) -> None:
        self.batches, self.skip = batches, skip

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return len(self.batches)


def rng_state() -> dict:
    """The global RNG states as tensors, ints and tuples only, so weights-only loading accepts them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableLoader(DataLoader):
    """A training DataLoader whose position, shuffle and RNG survive a checkpoint (see the module docstring).

    Built like a ``DataLoader`` with ``sampler=EpochShuffleSampler(dataset)``; under a distributed strategy
    Lightning wraps that sampler, and the loader still finds it.
    """

    _skip = 0
    _position = 0
    _resume: dict | None = None
    #: batches Lightning takes per epoch (``trainer.limit_train_batches``; set by the data module): a state at that
    #: position is a finished epoch
    epoch_length: int | None = None

    @property
    def _index_sampler(self):
        base = super()._index_sampler
        return _SkipBatches(base, self._skip) if self._skip else base

    def _shuffle_sampler(self) -> EpochShuffleSampler | None:
        sampler, seen = self.sampler, 0
        while sampler is not None and not isinstance(sampler, EpochShuffleSampler) and seen < 4:
            # Lightning's DistributedSamplerWrapper keeps the original sampler at .dataset._sampler
            sampler = getattr(sampler, "_sampler", None) or getattr(sampler, "dataset", None)
            seen += 1
        return sampler if isinstance(sampler, EpochShuffleSampler) else None

    def progress(self) -> dict:
        """Where this epoch stands: batches handed out and the seed of its shuffle."""
        sampler = self._shuffle_sampler()
        return {"position": self._position, "epoch_seed": sampler.epoch_seed if sampler else None}

    def state_dict(self) -> dict:
        return {**self.progress(), "rng": _every_rank(rng_state())}

    def load_state_dict(self, state: dict) -> None:
        self._resume = _this_rank(state)

    def resume_at(self, progress: dict) -> None:
        """Continue at ``progress`` (see :meth:`progress`) and leave the global RNG to the caller (CycleLoader)."""
        self._resume = {**progress, "rng": None}

    def __iter__(self):
        state, self._resume = self._resume, None
        position = 0
        if state is not None and state["position"] >= (self.epoch_length or len(self)) and state["rng"] is not None:
            # the finished epoch's iterator, which Lightning draws from once when the checkpoint ended a run at an
            # epoch's last step: nothing is left in it, and the next epoch's starts from the restored RNG
            self._position = state["position"]
            set_rng_state(state["rng"])
            return iter(())
        if state is not None and 0 < state["position"] < len(self):
            # mid-epoch: same shuffle, skip what was trained on, RNG restored before the next batch
            position = self._skip = state["position"]
            sampler = self._shuffle_sampler()
            if sampler is not None and state["epoch_seed"] is not None:
                sampler.replay(state["epoch_seed"])
        iterator = super().__iter__()
        self._skip = 0
        if state is not None and position == 0 and state["rng"] is not None:
            # before the epoch's first batch: its shuffle is drawn from the restored RNG, as it was originally.
            # Restored after creating the iterator, which draws DataLoader's worker base seed from the global RNG,
            # as the uninterrupted run did before the checkpoint
            set_rng_state(state["rng"])
            state = None
        return self._count(iterator, position, state)

    def _count(self, iterator, position, state):
        self._position = position
        for batch in iterator:
            if state is not None and state["rng"] is not None:
                set_rng_state(state["rng"])
                state = None
            self._position += 1
            yield batch


class CycleLoader:
    """Batches ``{name: batch}`` over several :class:`ResumableLoader` s, resumable like one of them.

    An epoch lasts as long as the longest loader; a shorter one starts its next cycle (a fresh shuffle) when it runs
    out, as Lightning's ``CombinedLoader`` does in ``max_size_cycle`` mode. It is not that CombinedLoader because
    each of its loaders would save and restore the global RNG on its own: on resume the first one's restore undoes
    what another drew meanwhile, and a loader whose cycle ended with the checkpoint started its next one before the
    restore rather than after. Here the RNG has one owner: restored once, before the first batch (mid-epoch) or after
    the loaders' iterators are created (at an epoch boundary), as in ResumableLoader; a loader that had just run out
    starts its next cycle at the next batch, from the restored RNG, as it would have.
    """

    def __init__(self, loaders: dict[str, ResumableLoader]) -> None:
        self.loaders = loaders
        self.sampler = _EverySampler(loaders)
        self._position = 0
        self._resume: dict | None = None
        self.epoch_length: int | None = None  # as ResumableLoader's

    def __len__(self) -> int:
        return max(len(loader) for loader in self.loaders.values())

    def state_dict(self) -> dict:
        return {"position": self._position, "rng": _every_rank(rng_state()),
                "loaders": {name: loader.progress() for name, loader in self.loaders.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = sorted(state.get("loaders") or {})
        if saved != sorted(self.loaders):
            raise PeftLabError(f"the checkpoint's training data has the tasks {saved or 'of an older peftlab'}, this "
                               f"run {sorted(self.loaders)}: resume with the data.tasks it was trained with")
        self._resume = _this_rank(state)

    def __iter__(self):
        state, self._resume = self._resume, None
        if state is not None and state["position"] >= (self.epoch_length or len(self)):  # finished (ResumableLoader)
            self._position = state["position"]
            set_rng_state(state["rng"])
            return iter(())
        if state is None or state["position"] == 0:
            iterators = {name: iter(loader) for name, loader in self.loaders.items()}
            if state is not None:  # after creating the iterators, as ResumableLoader does
                set_rng_state(state["rng"])
            return self._batches(iterators, 0, None)
        iterators = {}
        for name, loader in self.loaders.items():
            progress = state["loaders"][name]
            if progress["position"] < len(loader):
                loader.resume_at(progress)
                iterators[name] = iter(loader)
            else:  # its cycle ended with the checkpoint: the next one starts at the next batch
                iterators[name] = iter(())
        return self._batches(iterators, state["position"], state)

    def _batches(self, iterators: dict, position: int, state: dict | None):
        self._position = position
        while self._position < len(self):
            if state is not None:
                set_rng_state(state["rng"])
                state = None
            batch = {}
            for name, iterator in iterators.items():
                try:
                    batch[name] = next(iterator)
                except StopIteration:
                    iterators[name] = iterator = iter(self.loaders[name])
                    batch[name] = next(iterator)
            self._position += 1
            yield batch


class _EverySampler:
    """Lightning calls ``set_epoch`` on a training loader's ``sampler`` (a DistributedSampler's order per epoch)."""

    def __init__(self, loaders: dict[str, DataLoader]) -> None:
        self.loaders = loaders

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders.values():
            set_epoch = getattr(loader.sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)


def epoch_length(length: int, limit: int | float | None) -> int:
    """The batches Lightning takes per epoch from a training loader of ``length`` under ``limit_train_batches``
    (an int caps them, a float is a fraction), as Lightning computes it."""
    if limit is None:
        return length
    if isinstance(limit, int):
        return min(length, limit)
    return int(length * float(limit))


def _this_rank(state: dict) -> dict:
    rng = state.get("rng")
    if isinstance(rng, list):  # one state per rank (see _every_rank): this rank's
        rank = process_rank()
        state = {**state, "rng": rng[rank] if rank < len(rng) else rng[0]}
    return state


def process_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _every_rank(state: dict) -> dict | list[dict]:
    """This process's RNG state, or under several processes every rank's, gathered (a collective: Lightning
    collects loader states on every rank when it writes a checkpoint, and rank 0 writes them). Each rank draws
    its own dropout masks from its own stream; restoring rank 0's everywhere would change every other rank's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return state
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def training_sampler(dataset, shuffle: bool = True, lengths: list[int] | None = None,
                     batch_size: int = 1) -> Sampler[int]:
    """The training sampler: :class:`EpochShuffleSampler` in one process; under a distributed strategy a
    ``DistributedSampler`` seeded by the run's seed and the epoch, built here rather than by Lightning's
    wrapper, because every rank must draw the same order and the global RNGs of the ranks need not agree."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(dataset, shuffle=shuffle, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
    if not shuffle:
        return torch.utils.data.SequentialSampler(dataset)
    return EpochShuffleSampler(dataset, lengths=lengths, batch_size=batch_size)


def eval_generator() -> torch.Generator:
    """A fixed generator for evaluation loaders, so creating them never advances the global RNG."""
    generator = torch.Generator()
    generator.manual_seed(0)
    return generator
