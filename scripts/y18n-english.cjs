// Stand-in for `y18n` in the single-file bundle (scripts/bundle.mjs aliases it): yargs'
// messages in its own English, formatted exactly as y18n formats them, but without
// y18n's locale files, which it would read from `<bundle folder>/../locales/` at run
// time. The bundle reads no file beside itself.
'use strict';
const { format } = require('node:util');

module.exports = function y18n() {
  let locale = 'en';
  const strings = Object.create(null);
  const done = (args) => {
    if (typeof args[args.length - 1] === 'function') args.pop()();
  };
  return {
    __(str, ...args) {
      done(args);
      return format(strings[str] || str, ...args);
    },
    __n(singular, plural, quantity, ...args) {
      done(args);
      const entry = strings[singular];
      const str = entry ? entry[quantity === 1 ? 'one' : 'other'] : quantity === 1 ? singular : plural;
      return str.includes('%d') ? format(str, quantity, ...args) : format(str, ...args);
    },
    setLocale(l) {
      locale = l;
    },
    getLocale() {
      return locale;
    },
    updateLocale(obj) {
      Object.assign(strings, obj);
    },
    locale,
  };
};
