//! Enums with fixed lower-case names (`Display`/`FromStr`), shared by state, config and status.

/// A name that does not belong to the enum it was parsed as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?} (expected one of: {})", expected.join(", "))]
pub struct UnknownName {
    /// What was being parsed, e.g. "protocol".
    pub kind: &'static str,
    /// The text that did not match.
    pub value: String,
    /// The accepted names.
    pub expected: &'static [&'static str],
}

impl UnknownName {
    /// Renders the accepted names for error messages.
    pub fn expected_list(&self) -> String {
        self.expected.join(", ")
    }
}

/// Declares a fieldless enum whose variants have fixed names: `as_str`, `ALL`, `NAMES`,
/// `Display` and `FromStr` (exact, case-sensitive match).
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $kind:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// Every name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The fixed name of this variant.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::repl::names::UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    _ => Err($crate::repl::names::UnknownName {
                        kind: $kind,
                        value: s.to_string(),
                        expected: $name::NAMES,
                    }),
                }
            }
        }
    };
}

pub(crate) use named_enum;
