"""The coordinator: gRPC service, round state, aggregation, evaluation."""
