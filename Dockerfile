# Builds the godel binary and runs it. Used by docker-compose.yml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin godel

FROM debian:bookworm-slim
RUN useradd --system --home /data godel && mkdir -p /data && chown godel /data
COPY --from=build /src/target/release/godel /usr/local/bin/godel
COPY cluster-config /etc/godel
USER godel
EXPOSE 7373 7474
ENTRYPOINT ["godel"]
CMD ["serve"]
