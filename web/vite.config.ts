import { defineConfig } from "vite";

// The gateway serves dist/ at / (services/gateway/src/edgeway/gateway/console.py): the page,
// and its hashed assets under /assets/. `npm run dev` proxies the gateway's own endpoints.
const gateway = process.env.EDGEWAY_GATEWAY ?? "http://127.0.0.1:8000";

export default defineConfig({
  base: "/",
  build: { outDir: "dist", emptyOutDir: true, assetsDir: "assets", sourcemap: false },
  server: {
    proxy: {
      "^/(api|status|logger|toggle_offline|clear_data|readyz|metrics|health|video)": gateway,
      "^/(ws|client)": { target: gateway, ws: true },
    },
  },
});
