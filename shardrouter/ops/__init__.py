"""Operations: schema migrations, the lookup check, the MariaDB sandbox, the demo and the
benchmark."""
