"""fedkrso: federated fine-tuning of LLMs in random subspaces, over gRPC."""
