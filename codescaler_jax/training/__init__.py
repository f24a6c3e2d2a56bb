"""Parts shared by the RM and GRPO training loops."""
