// `node --import ./tests/js/register-importmap.mjs --test tests/js/`: see importmap-hooks.mjs.
import { register } from "node:module";

register("./importmap-hooks.mjs", import.meta.url);
