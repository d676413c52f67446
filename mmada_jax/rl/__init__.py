"""UniGRPO, the reinforcement-learning stage of MMaDA (specs/unigrpo.md).

Modules: `schedule` (mask-ratio schedules), `masks` (per-sample masks), `objective` (log-probs, advantages, clipped
surrogate + k3 KL), `step` (jitted precompute and policy step), `rewards` (pluggable reward components), `prompts`
(prompt sources), `t2i` (the text-to-image task), `programs` (the compiled precompute and step of a run), `setup` (a
run: mesh, state, reference, prompts, programs), `rollout` (rollouts, group selection, the step's batch), `evaluate`
(held-out accuracy), `loop` (the RL loop behind `mmada-jax rl`).

Decisions on what the paper leaves open (spec §8), all switchable in the `rl` config section:
  1. Schedule: Algorithm 1's formula (p_μ = 1; the §5.2 worked example contradicts it and is not followed), one start
     per response (`rl.schedule_shared=False`), T = 1000; alternatives stratified_wrap / iid / range.
  2. Masks: exact counts, at least one token (`rl.mask_law`); no p floor (`rl.p_min=0`); positions after the first EOS
     may be masked (`rl.mask_tail`) but only positions up to and including the first EOS enter the loss
     (`rl.loss_tail`).
  3. Loss: sample-level (App. A.2), each response's terms averaged over its masked loss tokens (`rl.seq_normaliser`
     "masked"; "response" is the literal 1/|o_i|); token-level as an option.
  4. Advantages: (r − mean)/std per group, population std, 0 when std < 1e-6; zero-std groups counted, kept by default.
  5. KL: k3 to the frozen initial policy on the loss tokens, β = 0.04 (`rl.kl_beta`).
  6. K = 1 mask per gradient step (`rl.masks_per_step`), μ = 4 inner steps.
  7. Rewards: ToyWorld `check_answer` on the text after the last `</think>` (correctness 2.0, 0 when truncated), soft
     `<think>...</think>` format 0.5; image checker / CLIP / ImageReward components for text-to-image.
  8. Rollouts: the semi-autoregressive sampler at temperature 1, low-confidence commits, no truncation of the
     distribution; log-probs use the sampler's padding mask.
  9. Text-to-image (`rl.task="t2i"`, `t2i`): MaskGIT rollouts with the `sampling.image` settings (guidance included),
     log-probs of the conditional model over the image codebook, `<|eoi|>` never masked; image rewards.
"""
