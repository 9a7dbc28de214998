"""The self-play engine: one round of any method, and the loop around rounds.

A round samples from π_t, turns samples into training examples with an oracle,
computes the anchors' log-probs once, and runs the method's regression (ONPO
through `onpo_step`). The engine does this for every method in the method
table; what differs between the toy testbed and a real checkpoint (how to
sample, how to build examples, how to score sequences) comes from a backend.
This package imports the core math (`losses`, `pairs`, `onpo_step`,
`sampler`), `oracles` and `infra`; it never imports a job (`testbed`, `llm`).
"""
