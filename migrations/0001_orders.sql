-- 0001: the order schema, in logical table names. `shardctl schema apply` writes every
-- statement once per physical table of each shard (orders -> orders_0000 .. orders_0003).
-- Ids come from the shardrouter id generator: no AUTO_INCREMENT anywhere (each shard would
-- count on its own and hand out the same ids).

CREATE TABLE users (
  user_id     BIGINT       NOT NULL,
  email       VARCHAR(255) NOT NULL,
  name        VARCHAR(255) NULL,
  created_at  DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE orders (
  order_id      BIGINT      NOT NULL,
  user_id       BIGINT      NOT NULL,
  merchant_id   BIGINT      NOT NULL,
  status        VARCHAR(16) NOT NULL,
  amount_cents  BIGINT      NOT NULL,
  created_at    DATETIME(3) NOT NULL,
  PRIMARY KEY (order_id),
  INDEX idx_user_created (user_id, created_at),
  INDEX idx_merchant_created (merchant_id, created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Bound to orders: an order's items live in the same shard and the same split.
CREATE TABLE order_items (
  order_id     BIGINT      NOT NULL,
  line         INT         NOT NULL,
  user_id      BIGINT      NOT NULL,
  sku          VARCHAR(64) NOT NULL,
  qty          INT         NOT NULL,
  price_cents  BIGINT      NOT NULL,
  PRIMARY KEY (order_id, line),
  INDEX idx_user (user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Lookup rows merchant_id -> (order_id, user_id), sharded by merchant. The router writes
-- (merchant_id, user_id, order_id) only, so created_at defaults to the time of that write.
CREATE TABLE merchant_orders (
  merchant_id  BIGINT      NOT NULL,
  order_id     BIGINT      NOT NULL,
  user_id      BIGINT      NOT NULL,
  created_at   DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (merchant_id, order_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Lookup rows email -> user_id, sharded by the email text: one owner per email.
CREATE TABLE user_emails (
  email    VARCHAR(255) NOT NULL,
  user_id  BIGINT       NOT NULL,
  PRIMARY KEY (email)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Broadcast: the same rows on every shard.
CREATE TABLE countries (
  code  CHAR(2)     NOT NULL,
  name  VARCHAR(64) NOT NULL,
  PRIMARY KEY (code)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
