"""What rejection sampling and PPO share: reward model scoring and the combined reward."""
