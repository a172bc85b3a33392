"""What every snpemu service process shares: config, logs, metrics, the gRPC server bootstrap."""
