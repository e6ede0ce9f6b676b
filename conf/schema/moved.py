"""Config keys that moved (old dotted key -> new dotted key): loading a config that still sets an old key fails
with one line naming the new one. A moved section (`ppo.combined`) takes its sub-keys with it."""

MOVED: dict[str, str] = {
    "ppo.temperature": "ppo.sampling.temperature",
    "ppo.top_p": "ppo.sampling.top_p",
    "ppo.max_new_tokens": "ppo.sampling.max_new_tokens",
    "ppo.reward_helpfulness": "ppo.reward_models.helpfulness",
    "ppo.reward_safety": "ppo.reward_models.safety",
    "ppo.combined": "ppo.reward_models.combined",
    "rejection_sampling.temperature": "rejection_sampling.sampling.temperature",
    "rejection_sampling.top_p": "rejection_sampling.sampling.top_p",
    "rejection_sampling.max_new_tokens": "rejection_sampling.sampling.max_new_tokens",
    "rejection_sampling.reward_helpfulness": "rejection_sampling.reward_models.helpfulness",
    "rejection_sampling.reward_safety": "rejection_sampling.reward_models.safety",
    "rejection_sampling.combined": "rejection_sampling.reward_models.combined",
    # The auxiliary loss is the safety RM's alone (Table 29): a shared key made the helpfulness RM's step fail.
    "reward.aux_loss_weight": "reward.safety.aux_loss_weight",
    # A loss weight had no effect on a critic with an optimizer of its own (AdamW is scale-free): its step size is
    # its learning rate.
    "ppo.value_coef": "ppo.critic_lr",
}

# Keys PPO never read, removed with no successor (PpoConfig no longer inherits the token-batch knobs).
REMOVED: tuple[str, ...] = ("ppo.global_batch_tokens", "ppo.seq_len", "ppo.log_every")
