# The node agent's image: our binary on a base that carries iptables (both
# the legacy and the nft backend, which --iptables-backend auto chooses
# between, as kube-proxy's image does).
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/kube-userspace-proxy ./cmd/kube-userspace-proxy

FROM debian:bookworm-slim
# The same packages as hack/image/packages (make image): a test holds the two together.
RUN apt-get update && apt-get install -y --no-install-recommends iptables nftables iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/kube-userspace-proxy /usr/local/bin/kube-userspace-proxy
ENTRYPOINT ["/usr/local/bin/kube-userspace-proxy"]
