"""The decoders' evaluation as a Lightning test: every exit rule through real generation.

`trainer.test(GenerationEvalSystem(...), dataloaders=prompt_batches)` generates each prompt batch
under every rule point (`evaluation.generation_eval.generate_batch`) in one test step, after the
prompts' pass, which all points share. `report` then scores the whole split (ROUGE, agreement,
FLOPs, tokens per second).

Because it runs inside a Trainer of the run's config, the configured loggers and callbacks see
it: the policy's exits at its trained tau are counted in `exit_counts["test"]`, which
`callbacks.ExitHistogram` logs at the test's end (scalars `test/exit/frac_L<e>`, wandb charts, a
line of `exit_histograms.jsonl`), one bin per exit (`num_exits`). The
histogram has no memorized-exit buckets (`exit_buckets = False`): a generated token's memorized
exit needs every exit's greedy token, which the policy rule never computes (it calls the LM head
only where a token exits), and computing them would change the cost being measured.

Under DDP each process generates every world_size-th batch (the Trainer gets
`use_distributed_sampler=False`: a distributed sampler would pad the last shard with repeated
prompts); at the test's end every process receives all of them, in batch order, so `report` scores
the whole split once and `generations` lists each prompt's tokens and exit layers in prompt order. The exit counts are per process; the exit-histogram callback sums them.
"""
from __future__ import annotations

import lightning as L
import torch

from ee_lightning.evaluation.generation_cost import measure_generation_flops, timed
from ee_lightning.evaluation.generation_eval import (deferred_timing_note, flat_exit_layers, generate_batch,
                                                     generation_rows, library_generate, merge_runs, policy_at,
                                                     score_points)
from ee_lightning.exits.rules import FullRule
from ee_lightning.inference.generate import prefill
from ee_lightning.progress import progress
from ee_lightning.training.held import Held
from ee_lightning.training.processes import all_processes


class GenerationEvalSystem(L.LightningModule):
    """Test only. rules: `generation_eval.rule_points_grid(...)`, `full` first; tau: the policy's
    trained threshold, whose exits the exit-histogram callback receives (one of `rules`)."""

    evaluates_policy = True  # callbacks.ExitHistogram emits `exit_counts` at the test's end
    exit_buckets = False     # one row of counts over the exits, no memorized-exit buckets (see the module)

    def __init__(self, decoder, tokenizer, exits, rules: list, max_new_tokens: int, policy=None, classifier=None,
                 tau: float | None = None, kv: str = "propagate", timed_rows: int | None = None):
        super().__init__()
        self._held = Held(decoder)  # Lightning neither moves, saves nor switches it
        self.tokenizer = tokenizer
        self.exits, self.policy, self.classifier = exits, policy, classifier
        self.rules, self.max_new_tokens, self.kv = list(rules), int(max_new_tokens), kv
        # kv=defer: the text from the batched pass with deferral's tokens, the clock from this many prompts per batch
        self.timed_rows = timed_rows if kv == "defer" else None
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.tau_index = policy_at(self.rules, tau) if policy is not None and tau is not None else None
        self.flops = None
        self.exit_counts: dict[str, torch.Tensor] = {}
        self._reset()

    def _reset(self) -> None:
        self.runs: list[list[dict]] = [[] for _ in self.rules]  # per rule point, its batches' runs
        self.prefill_seconds = 0.0
        self.library = {"seconds": 0.0, "generated": 0}
        self.references: list[str] = []  # of the prompts tested, in order
        self.batch_order: list[int] = []  # the test batch index of each batch in `runs`

    @property
    def decoder(self):
        return self._held.model

    @property
    def exit_layers(self) -> list[int]:
        return list(self.exits.exit_layers)

    @property
    def num_exits(self) -> int:
        """E: the exit histogram has a bin per exit, as the policy stage's."""
        return len(self.exit_layers)

    def on_test_start(self) -> None:
        self.decoder.to(self.device)  # held outside the module tree: placed here, on this process's device
        self.flops = measure_generation_flops(self.decoder, self.exits, self.policy, self.classifier)

    def on_test_epoch_start(self) -> None:
        self.exit_counts.pop("test", None)
        self._reset()

    def test_step(self, batch, batch_idx):
        trainer = self._trainer  # None when called outside a Trainer: one process, every batch
        if trainer is not None and batch_idx % trainer.world_size != trainer.global_rank:
            return  # another process's batch
        decoder, exits = self.decoder, self.exits
        if not self.batch_order:  # warm-up: the first pass pays one-off allocation costs that would bias the first rule
            generate_batch(decoder, exits, FullRule(), batch, 2, self.eos, self.pad)
        self.batch_order.append(batch_idx)
        self.references.append(list(batch["references"]))
        # The prompts' pass is the same for every rule: run once and shared (copied) by all.
        cache, seconds = timed(prefill, decoder, batch["input_ids"], batch["attention_mask"])
        self.prefill_seconds += seconds
        batch = {**batch, "prompt_cache": cache}
        points = progress(self.rules, f"generation, prompt batch {batch_idx + 1}", unit="rule")
        for index, (name, value, rule) in enumerate(points):
            run = generate_batch(decoder, exits, rule, batch, self.max_new_tokens, self.eos, self.pad, self.policy,
                                 self.classifier, self.flops, kv=self.kv, timed_rows=self.timed_rows)
            points.set_postfix_str(f"{name} {'' if value is None else value}: "
                                   f"{run['generated'] / max(run['seconds'], 1e-9):.1f} tokens/s")
            self.runs[index].append(run)
            if index == self.tau_index:
                self._count_exits(flat_exit_layers(run))
        seconds, generated = library_generate(decoder, batch, self.max_new_tokens, self.eos, self.pad,
                                              rows=self.timed_rows)
        self.library["seconds"] += seconds
        self.library["generated"] += generated

    def _count_exits(self, exit_layers: torch.Tensor) -> None:
        """Add generated tokens' exit layers to `exit_counts["test"]`, one bin per exit (1..E)."""
        exit_index = torch.zeros(self.exit_layers[-1] + 1, dtype=torch.long)
        exit_index[self.exit_layers] = torch.arange(1, self.num_exits + 1)
        counts = torch.bincount(exit_index[exit_layers.cpu()] - 1, minlength=self.num_exits).to(self.device)
        self.exit_counts["test"] = counts + self.exit_counts["test"] if "test" in self.exit_counts else counts

    def on_test_epoch_end(self) -> None:
        """Every process's batches, in batch order, in every process."""
        mine = {"order": self.batch_order, "runs": [[{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                       for k, v in run.items()} for run in runs] for runs in self.runs],
                "references": self.references, "prefill": self.prefill_seconds, "library": self.library}
        shards = all_processes(mine)
        order = sorted((batch_idx, s, i) for s, shard in enumerate(shards) for i, batch_idx in enumerate(shard["order"]))
        self.runs = [[shards[s]["runs"][r][i] for _, s, i in order] for r in range(len(self.rules))]
        self.references = [text for _, s, i in order for text in shards[s]["references"][i]]
        self.batch_order = [batch_idx for batch_idx, _, _ in order]
        self.prefill_seconds = sum(shard["prefill"] for shard in shards)
        self.library = {key: sum(shard["library"][key] for shard in shards) for key in ("seconds", "generated")}

    def report(self) -> tuple[list[dict], dict]:
        """The points and extras of the last test (`generation_eval.score_points`) against the
        references of the prompts it saw."""
        if not self.references:
            raise ValueError("no prompt was generated: the test saw no batch (an empty generation split, or "
                             "trainer.limit_test_batches=0)")
        points, extras = score_points(self.rules, self._merged(), self.tokenizer, self.references,
                                      self.decoder.num_layers, self.prefill_seconds, self.library)
        if self.timed_rows is not None:
            extras["timing"] = deferred_timing_note(self.timed_rows)
        return points, extras

    def generations(self) -> list[dict]:
        """Every rule point's tokens and exit layers per prompt of the last test, in prompt order
        (`generation_eval.generation_rows`)."""
        return generation_rows(self.rules, self._merged())

    def _merged(self) -> list[dict]:
        return [merge_runs(batches) for batches in self.runs]
