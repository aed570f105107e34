"""PostgreSQL storage: connection, migrations, partitions, the batch writer, queries."""
