"""The exact-evaluation testbed job: a toy world where every response can be enumerated.

`env` builds it (prompts, all |Y| = V^L responses, the SFT start distribution,
a tiny policy), `evaluation` computes exact quantities of a policy (its full
probability table, duality gap, win rates, the per-prompt Nash by LP), and
`job` is the main job (`make run`): SFT, then rounds of every method on the
self-play engine. May import the core math, `oracles`, `selfplay`, `tabular`,
`models` and `infra`.
"""
