"""Stage ppo: PPO against the combined reward (paper §3.2.3)."""
