"""Long-running services and transports: Kafka, the spool, the distributor server, batch, listen."""
