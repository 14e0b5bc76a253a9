"""The complexity-scoring router: the front door that sends each request to a tier over NATS."""
